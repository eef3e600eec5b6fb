"""Specifications of SharedTrunk: the split computes what the whole model computes, the trunk runs once per
batch and gathers every branch's gradient, and bad splits are named."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, SharedTrunk

FAMILIES = {
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=5), "layer3"),
    "timm resnet": (lambda: timm.create_model("test_resnet", num_classes=5), "layer2"),
    "timm convnext": (lambda: timm.create_model("test_convnext", num_classes=5), "stages.1"),
    "torchvision mobilenet": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), "features.4"),
    "timm efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=5), "blocks.2"),
    "timm vit": (lambda: timm.create_model("test_vit", num_classes=5, img_size=32), "blocks.1"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_branch_computes_its_whole_model(family):
    make, stage = FAMILIES[family]
    torch.manual_seed(0)
    first, second = make().eval(), make().eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want_first = first(images)
        twin = copy.deepcopy(first)  # a branch on the first model's trunk is the first model with its own top
        twin.load_state_dict(
            second.state_dict() | {k: v for k, v in first.state_dict().items() if k in _prefix_keys(first, stage)}
        )
        want_second = twin(images)
        out = SharedTrunk([first, second], stage).eval()(images)
    assert out.member_logits.shape == (2, 2, 5)
    assert torch.allclose(out.member_logits[0], want_first, atol=1e-5)
    assert torch.allclose(out.member_logits[1], want_second, atol=1e-5)


def _prefix_keys(model: nn.Module, stage: str) -> set[str]:
    """State-dict keys of the modules that run before ``stage``, read from the whole model by hand."""
    if stage.startswith("blocks.") and hasattr(model, "pos_embed"):  # a ViT: embeddings and the first blocks
        depth = int(stage.split(".")[1])
        keep = ("patch_embed.", "cls_token", "pos_embed", "reg_token", "norm_pre.")
        return {
            k
            for k in model.state_dict()
            if k.startswith(keep) or any(k.startswith(f"blocks.{i}.") for i in range(depth))
        }
    top, _, inner = stage.partition(".")
    names = [name for name, _ in model.named_children()]
    before = {f"{name}." for name in names[: names.index(top)]}
    if inner:
        before |= {f"{top}.{i}." for i in range(int(inner))}
    return {k for k in model.state_dict() if any(k.startswith(prefix) for prefix in before)}


@pytest.mark.parametrize("family", ["timm resnet", "timm vit"])
def test_the_trunk_runs_once_and_gathers_every_branch(family):
    make, stage = FAMILIES[family]
    torch.manual_seed(1)
    model = SharedTrunk([make() for _ in range(3)], stage)
    calls = []
    model.trunk.register_forward_hook(lambda *_: calls.append(1))
    out = model(torch.rand(4, 3, 32, 32))
    assert len(calls) == 1
    params = list(model.trunk.parameters())
    losses = out.member_logits.square().mean(dim=(1, 2))  # (N,) one loss per branch
    per_branch = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    together = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    assert all(any(g.abs().sum() > 0 for g in grads) for grads in per_branch)  # every branch reaches the trunk
    for a, *parts in zip(together, *per_branch, strict=True):
        # a conv weight gradient sums ~10^3 products in an order the backend picks: float32 agrees to ~1e-5 of its scale
        torch.testing.assert_close(a, sum(parts), rtol=0, atol=1e-5 * a.abs().max().item())
    loss = out.member_logits.sum()
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []  # no parameter left behind in a branch (DDP would refuse them)


@pytest.mark.parametrize("family", ["timm resnet", "timm vit"])
def test_cekd_gates_the_branches_of_a_trunk(family):
    """The recipe of docs/online.rst: Sequential(trunk, CollaborativeEnsemble(branches, "gate")) gives CEKDLoss
    the branches' logits and their gated ensemble; the loss reaches the trunk, every branch and the gate."""
    make, stage = FAMILIES[family]
    torch.manual_seed(3)
    shared = SharedTrunk([make() for _ in range(2)], stage)
    ensemble = CollaborativeEnsemble(list(shared.branches), combine="gate")
    model = nn.Sequential(shared.trunk, ensemble)
    images, target = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(images)
    with torch.no_grad():
        torch.testing.assert_close(out.member_logits, shared(images).member_logits)
        pooled = torch.cat([tap.pooled.flatten(1) for tap in ensemble._taps], dim=1)
        gate = ensemble.head(pooled).softmax(dim=1)  # (B, N)
        torch.testing.assert_close(out.ensemble_logits, (gate.T[..., None] * out.member_logits).sum(0))
    CEKDLoss()(out, target, step=10**6).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert ensemble.head.weight.grad.abs().sum() > 0 and any(p.grad.abs().sum() > 0 for p in shared.trunk.parameters())


def test_branches_keep_their_own_models_and_share_no_parameters():
    models = [timm.create_model("test_resnet", num_classes=5) for _ in range(3)]
    heads = [m.fc.weight for m in models]
    model = SharedTrunk(models, "layer2")
    assert [branch.fc.weight for branch in model.branches] == heads
    trunk_ids = {id(p) for p in model.trunk.parameters()}
    assert all(id(p) not in trunk_ids for branch in model.branches for p in branch.parameters())
    assert "stage='layer2', branches=3" in repr(model)


def test_the_split_traces_whole():
    torch.manual_seed(2)
    model = SharedTrunk([timm.create_model("test_resnet", num_classes=5) for _ in range(2)], "layer2").eval()
    images = torch.rand(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(images).member_logits, model(images).member_logits, atol=1e-5)


def test_bad_splits_are_named():
    resnets = lambda: [timm.create_model("test_resnet", num_classes=5) for _ in range(2)]  # noqa: E731
    with pytest.raises(ValueError, match="N >= 2 models, got list of 1"):
        SharedTrunk(resnets()[:1], "layer2")
    model = timm.create_model("test_resnet", num_classes=5)
    with pytest.raises(ValueError, match="distinct objects"):
        SharedTrunk([model, model], "layer2")
    with pytest.raises(ValueError, match="share one architecture"):
        SharedTrunk([model, torchvision.models.mobilenet_v3_small(num_classes=5)], "layer2")
    with pytest.raises(ValueError, match=r"`stage` must name a child .*'layer1'.*got 'layer9'"):
        SharedTrunk(resnets(), "layer9")
    with pytest.raises(ValueError, match="first module: the trunk would be empty"):
        SharedTrunk(resnets(), "conv1")
    with pytest.raises(ValueError, match=r"`stage` 'stages.7' must name a child of 'stages'"):
        SharedTrunk([timm.create_model("test_convnext", num_classes=5) for _ in range(2)], "stages.7")
    with pytest.raises(ValueError, match=r"'blocks.<i>' with 0 < i < 6 .*got 'blocks.0'"):
        SharedTrunk([timm.create_model("test_vit", num_classes=5) for _ in range(2)], "blocks.0")
    with pytest.raises(ValueError, match="up to 'layer3': model 1 differs from 0"):
        SharedTrunk([torchvision.models.resnet18(), torchvision.models.resnet34()], "layer3")
    with pytest.raises(TypeError, match="`stage` must be a module name"):
        SharedTrunk(resnets(), 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "stage"),
    [
        (lambda: torchvision.models.resnet18(num_classes=5), "layer3"),
        (lambda: timm.create_model("test_resnet", num_classes=5), "layer3"),
        (lambda: timm.create_model("convnext_atto", num_classes=5), "stages.2"),
    ],
    ids=["torchvision-resnet18", "timm-test_resnet", "timm-convnext"],
)
def test_a_member_is_the_model_it_was_cut_from_and_its_cams_are_that_models(make, stage):
    """trunk + branch 0 computes what model 0 computed before the split: its logits and, through a FeatureTap,
    its CAMs (SnapMix on a trunk), with the same modules (nothing copied, nothing saved twice)."""
    torch.manual_seed(0)
    models = [make() for _ in range(2)]
    whole = copy.deepcopy(models[0]).eval()
    shared = SharedTrunk(models, stage).eval()
    member = shared.member(0)
    images, labels = torch.rand(3, 3, 64, 64), torch.tensor([0, 4, 2])
    assert torch.allclose(member(images), whole(images), atol=1e-5)
    assert torch.equal(FeatureTap(member).cams(images, labels), FeatureTap(whole).cams(images, labels))
    assert member.trunk is shared.trunk and member.branch is shared.branches[0]
    assert set(shared.state_dict()) == {f"trunk.{k}" for k in shared.trunk.state_dict()} | {
        f"branches.{k}" for k in shared.branches.state_dict()
    }
    with pytest.raises(ValueError, match=r"`index` must be a branch in \[0, 2\)"):
        shared.member(2)


def test_views_run_the_trunk_once_each_and_branch_i_on_view_i():
    """PCL's per-peer views on a trunk: N trunk forwards, branch i on trunk(view i)."""
    torch.manual_seed(0)
    shared = SharedTrunk([torchvision.models.resnet18(num_classes=4) for _ in range(3)], "layer3").eval()
    calls = []
    shared.trunk.register_forward_hook(lambda module, args, out: calls.append(1))
    views = [torch.rand(2, 3, 32, 32) for _ in range(3)]
    out = shared(views)
    assert len(calls) == 3 and out.member_logits.shape == (3, 2, 4) and out.features.shape[:2] == (3, 2)
    for i, view in enumerate(views):
        assert torch.allclose(out.member_logits[i], shared.branches[i](shared.trunk(view)), atol=1e-6)
    with pytest.raises(ValueError, match=r"one view per branch \(3\), got 2"):
        shared(views[:2])
