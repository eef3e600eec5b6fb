"""Build a torchvision or timm classifier for K classes, optionally from local pretrained weights."""

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


def build_model(arch: str, num_classes: int, pretrained: str | None = None, image_size: int | None = None) -> nn.Module:
    """``arch``: a torchvision classification model name (resnet18, resnet50, ...) or ``timm:<name>``.

    The head is built for ``num_classes``. ``image_size`` reaches the models that fix it at creation
    (timm ViT, DeiT, Swin and the like as ``img_size``; torchvision ViT as ``image_size``).
    ``pretrained`` is a local state-dict file (no download): every weight but the head's must match
    the architecture (position embeddings included, so their image size too).
    """
    if arch.startswith("timm:"):
        import timm

        name = arch[len("timm:") :]
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r} in --arch {arch!r}")
        try:
            model = timm.create_model(
                name, pretrained=False, num_classes=num_classes, **({"img_size": image_size} if image_size else {})
            )
        except TypeError:  # a model without a fixed input size (CNNs) takes no img_size
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {arch!r} in --arch; for timm use 'timm:<name>'")
        sized = {"image_size": image_size} if arch.startswith("vit_") and image_size else {}
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **sized)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights into ``model``, skipping the classifier head (rebuilt for the dataset's classes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained {path}: no such file (weights are never downloaded; pass a local state-dict file)"
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
            f"--pretrained {path} does not fit {type(model).__name__}: {len(missing)} weights missing "
            f"or of another shape (e.g. {missing[:3]}), {len(unused)} not used (e.g. {unused[:3]})"
        )
    model.load_state_dict(kept, strict=False)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classifier head (the paper trains them with a 10x learning rate)."""
    return list(_classifier(model).parameters())
