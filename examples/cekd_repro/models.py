"""Build a torchvision or timm classifier for K classes, optionally from ImageNet or local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cekd_losses import find_classifier


def _classifier(model: nn.Module) -> nn.Linear:
    head = find_classifier(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier head that cekd_losses.find_classifier finds")
    return head


IMAGENET = "imagenet"  # --pretrained imagenet: the architecture's default ImageNet weights, from its library's cache


def build_model(arch: str, num_classes: int, pretrained: str | None = None, image_size: int | None = None) -> nn.Module:
    """``arch``: a torchvision classification model name (resnet18, resnet50, ...) or ``timm:<name>``.

    The head is built for ``num_classes``. ``image_size`` reaches the models that fix it at creation
    (timm ViT, DeiT, Swin and the like as ``img_size``; torchvision ViT as ``image_size``).
    ``pretrained``: ``"imagenet"`` for the architecture's default ImageNet weights (torchvision's weight enum
    in torch.hub's cache under TORCH_HOME, or timm's pretrained configuration in the Hugging Face cache under
    HF_HOME; downloaded there when the machine is online), or a local state-dict file. Every weight but the
    head's must match the architecture (a torchvision ViT's position embeddings, so its image size too; timm
    resamples them).
    """
    if arch.startswith("timm:"):
        import timm

        name = arch[len("timm:") :]
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r} in --arch {arch!r}")
        model = _timm_model(name, num_classes, image_size, pretrained == IMAGENET)
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {arch!r} in --arch; for timm use 'timm:<name>'")
        sized = {"image_size": image_size} if arch.startswith("vit_") and image_size else {}
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **sized)
        if pretrained == IMAGENET:
            load_backbone(model, _torchvision_imagenet(arch), f"--pretrained imagenet ({arch})")
    if pretrained is not None and pretrained != IMAGENET:
        load_pretrained(model, pretrained)
    return model


def _timm_model(name: str, num_classes: int, image_size: int | None, imagenet: bool) -> nn.Module:
    """A timm model, with its default pretrained weights when ``imagenet`` (timm fits the head and, for token
    models, the position embeddings); a missing or unreachable file is a one-line error naming the cache."""
    import timm

    sized = {"img_size": image_size} if image_size else {}
    try:
        try:
            return timm.create_model(name, pretrained=imagenet, num_classes=num_classes, **sized)
        except TypeError:  # a model without a fixed input size (CNNs) takes no img_size
            return timm.create_model(name, pretrained=imagenet, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as error:
        if not imagenet:
            raise
        from huggingface_hub import constants

        config = timm.models.get_pretrained_cfg(name)
        source = getattr(config, "hf_hub_id", None) or getattr(config, "url", None) or "none"
        raise FileNotFoundError(
            f"--pretrained imagenet (timm:{name}): its weights ({source}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and could not be fetched ({type(error).__name__}: {_first_line(error)}); "
            "put them there (the cache follows HF_HOME) or pass a local state-dict file"
        ) from None


def _torchvision_imagenet(arch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch``'s default torchvision weights, read from torch.hub's cache (downloaded there
    when missing and the machine is online); a one-line error naming the file otherwise."""
    import os

    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT  # every classification model of it has some
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise FileNotFoundError(
            f"--pretrained imagenet ({arch}): {weights} is not in torchvision's cache ({path}) and could not be "
            f"downloaded ({type(error).__name__}: {_first_line(error)}); put the file there (the cache follows "
            "TORCH_HOME) or pass a local state-dict file"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a local state-dict file into ``model``, skipping the classifier head (rebuilt for the dataset's
    classes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained {path}: no such file (pass a local state-dict file, or imagenet for the "
            "architecture's ImageNet weights)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types
        raise ValueError(f"--pretrained {path}: not a PyTorch state-dict file ({type(error).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"--pretrained {path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}"
        )
    load_backbone(model, state, f"--pretrained {path}")


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` but for its classifier head; every other weight must be there, of the
    model's shapes (else a ValueError naming ``source`` and the first misfits)."""
    head = {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if module is _classifier(model)
        for p in ("weight", "bias")
    }
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k not in head and k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept and k not in head]
    unused = [k for k in state if k not in own and k not in head]
    if missing or unused:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: {len(missing)} weights missing "
            f"or of another shape (e.g. {missing[:3]}), {len(unused)} not used (e.g. {unused[:3]})"
        )
    model.load_state_dict(kept, strict=False)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classifier head (the paper trains them with a 10x learning rate)."""
    return list(_classifier(model).parameters())
