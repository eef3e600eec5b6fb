"""Specifications of the reproduction's engine: devices, models, training runs, divergence, what a run says."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from repro_helpers import EXAMPLES, TINY, TINY_ARGS, history

from cekd_losses import CollaborativeEnsemble
from cekd_repro import device, engine, methods, rundir
from cekd_repro.device import Placement
from cekd_repro.engine import train
from cekd_repro.models import build_model


def test_placement_normalises_uint8_on_the_device(device):
    place = Placement(device, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channels_last=True)
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    moved, labels = place.batch(images, torch.tensor([1, 0]))
    expected = (images.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).double().view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]
    ).double().view(1, 3, 1, 1)
    assert moved.device.type == device.type and labels.device.type == device.type
    assert moved.dtype == torch.float32 and moved.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(moved.cpu().double(), expected, atol=1e-5)
    as_float, _ = place.batch(images.float() / 255, torch.tensor([1, 0]))  # [0, 1] floats give the same
    assert torch.allclose(as_float, moved, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "cekd", "mix": "snapmix", "combine": "gate"},
        {"method": "baseline"},
        {"method": "mixup"},
        {"method": "one", "mix": "snapmix"},
        {"method": "pcl", "branches_from": "layer3"},
        {"method": "ffl", "branches_from": "layer3", "mix": "none"},
        {"method": "cekd", "branches_from": "layer3", "combine": "gate"},
    ],
    ids=["cekd-snapmix-gate", "baseline", "mixup", "one-snapmix", "pcl-trunk", "ffl-trunk-unmixed", "cekd-trunk-gate"],
)
def test_every_tensor_of_a_run_stays_on_its_device(overrides, tmp_path, monkeypatch):
    """The engine on the ``meta`` device, a stand-in accelerator that CPU-only CI has: a label, image,
    logit or metric that is not moved by the engine's Placement meets a meta tensor and raises, as it
    would on a GPU; a host read outside ``Placement.read`` raises too (meta tensors hold no values)."""
    reads = []

    def read(values):
        reads.append({name: value.device.type for name, value in values.items()})
        # every count and sum 1, and a clean divergence verdict (all zeros: nothing non-finite)
        return {name: [0.0 if name == "verdict" else 1.0] * value.numel() for name, value in values.items()}

    monkeypatch.setattr(Placement, "read", staticmethod(read))
    record = train(replace(TINY, device="meta", **overrides), tmp_path / "run")
    assert reads and all(kind == "meta" for read_ in reads for kind in read_.values())
    assert record["epoch"] == 1 and all(v == 100.0 for k, v in record.items() if k.startswith("top1_"))


def test_distributed_backend_follows_the_run_device(monkeypatch):
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(device.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(device.dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(device.dist, "get_rank", lambda: 0)
    device.distributed_ranks("cpu")
    device.distributed_ranks("cuda")
    assert backends == ["gloo", "nccl"]


def test_build_model_and_local_pretrained_weights(tmp_path):
    source = build_model("resnet18", 10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet18", 3, pretrained=str(tmp_path / "w.pth"))
    assert model.fc.out_features == 3
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert build_model("timm:resnet18", 3).get_classifier().out_features == 3
    with pytest.raises(FileNotFoundError, match="--pretrained .*missing.pth: no such file"):
        build_model("resnet18", 3, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="does not fit ResNet"):
        torch.save(build_model("resnet34", 3).state_dict(), tmp_path / "r34.pth")
        build_model("resnet18", 3, pretrained=str(tmp_path / "r34.pth"))
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet19'"):
        build_model("resnet19", 3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "baseline"},
        {"method": "mixup"},
        {"method": "cutmix"},
        {"method": "snapmix"},
        {"method": "cekd", "mix": "cutmix"},
        {"method": "cekd", "mix": "snapmix", "combine": "gate"},
        {"method": "cekd", "no_cross": True, "arch": "resnet18,timm:resnet18"},
        {"method": "cekd", "no_ensemble": True, "amp": "bf16", "channels_last": True},
        {"method": "snapmix", "arch": "timm:vit_tiny_patch16_224"},
        {"method": "cekd", "mix": "snapmix", "combine": "linear", "arch": "resnet18,timm:deit_tiny_patch16_224"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_smoke_every_method(overrides, tmp_path):
    record = train(replace(TINY, **overrides), tmp_path / "run")
    keys = {k for k in record if k.startswith("top1_")}
    expected = {"top1_model"} if overrides["method"] != "cekd" else {"top1_member0", "top1_member1", "top1_ensemble"}
    assert keys == expected
    assert all(0 <= record[k] <= 100 for k in keys)
    assert record["images_per_s"] > 0 and "loss_total" in record
    if overrides["method"] == "cekd":
        assert {"loss_supervised", "loss_cross", "loss_ensemble"} <= set(record)
    assert (tmp_path / "run" / "checkpoint.pt").exists() and len(history(tmp_path / "run")) == 1


ONLINE_RUNS = [
    ({"method": "dml"}, ["peers"]),
    ({"method": "one", "branches_from": "layer3", "members": 3}, ["teacher"]),
    ({"method": "one", "mix": "mixup"}, ["teacher"]),  # the gate on the members' pooled features
    ({"method": "ffl", "mix": "snapmix", "arch": "timm:test_resnet,resnet18"}, ["teacher", "to_teacher"]),
    ({"method": "pcl", "members": 3}, ["teacher", "mean_teachers"]),
    ({"method": "mcl", "branches_from": "layer3", "nce_k": 32}, ["mean_to_last", "contrast"]),  # MCL-OKD's branches
    ({"method": "cekd", "branches_from": "layer3", "combine": "gate"}, ["cross", "ensemble"]),  # CEKD on a trunk
]


@pytest.mark.parametrize(
    ("overrides", "terms"), ONLINE_RUNS, ids=["-".join(map(str, o.values())) for o, _ in ONLINE_RUNS]
)
def test_every_online_method_trains_logs_its_terms_and_evaluates_what_it_keeps(overrides, terms, tmp_path):
    config = replace(TINY, **{"arch": "timm:test_resnet", **overrides})
    record = train(config, tmp_path / "run")
    assert {k for k in record if k.startswith("loss_")} == {f"loss_{t}" for t in ["total", "supervised", *terms]}
    members = [f"member{i}" for i in range(config.members)]
    means = [f"mean{i}" for i in range(config.members)] if config.method == "pcl" else []
    assert [k for k in record if k.startswith("top1_")] == [f"top1_{n}" for n in [*members, "ensemble", *means]]


def test_cekd_on_a_trunk_runs_the_trunk_once_and_combines_its_branches():
    """--method cekd --branches-from: one trunk call per batch, each member is its branch on the trunk's output,
    and the gate's ensemble is the library's CollaborativeEnsemble over those branches."""
    config = replace(TINY, method="cekd", arch="timm:test_resnet", branches_from="layer3", combine="gate")
    torch.manual_seed(0)
    net = methods.cekd_ensemble([build_model(a, 4, None) for a in config.archs()], "gate", config.branches_from)
    trunk, ensemble = net
    calls = []
    trunk.register_forward_hook(lambda *args: calls.append(1))
    images = torch.randn(3, 3, 32, 32)
    out = net(images)
    assert calls == [1] and isinstance(ensemble, CollaborativeEnsemble) and len(ensemble) == 2
    features = trunk(images)
    for i, branch in enumerate(ensemble.members):
        torch.testing.assert_close(out.member_logits[i], branch(features))
    torch.testing.assert_close(out.ensemble_logits, ensemble(features).ensemble_logits)


def test_pcl_mean_models_follow_every_step_and_resume_exactly(tmp_path):
    config = replace(TINY, method="pcl", arch="timm:test_resnet", branches_from="layer2", epochs=2)
    train(config, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    updates = [v for k, v in saved.items() if k.endswith("_extra_state")]
    assert updates == [{"updates": 2 * (24 // 8), "buffers": "own"}]  # 24 images in batches of 8, 2 epochs


def test_clip_grad_bounds_every_update(tmp_path):
    """Plain SGD (no momentum, no weight decay, constant lr): 3 steps move the parameters by at most 3 lr clip."""
    config = replace(TINY, method="cekd", momentum=0.0, weight_decay=0.0, schedule="multistep", milestones=[99])
    torch.manual_seed(config.seed)  # the engine builds its members right after seeding
    start = CollaborativeEnsemble([build_model(config.arch, 4, None) for _ in range(2)])

    def distance_moved(run: str, clip: float | None) -> tuple[float, dict]:
        record = train(replace(config, clip_grad=clip), tmp_path / run)
        end = CollaborativeEnsemble([build_model(config.arch, 4, None) for _ in range(2)])
        end.load_state_dict(torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"])
        moved = torch.cat([(a - b).flatten() for a, b in zip(end.parameters(), start.parameters(), strict=True)])
        return moved.norm().item(), record

    clipped, record = distance_moved("clipped", 1e-3)
    free, _ = distance_moved("free", None)
    assert record["grad_norm"] > 1.0  # the clip was active: grad_norm is measured before clipping
    assert clipped <= 3 * config.lr * 1e-3 * (1 + 1e-4)
    assert free > 100 * clipped


def test_cam_figure_is_a_png(tmp_path):
    train(replace(TINY, method="cekd", visualize_cams=3), tmp_path / "run")
    png = (tmp_path / "run" / "cams.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_two_process_ddp_run_with_torchrun(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        str(EXAMPLES / "reproduce_cekd.py"),
        *TINY_ARGS,
        "--method",
        "cekd",
        "--run-dir",
        "ddp",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = history(tmp_path / "ddp")
    assert len(records) == 1 and "top1_ensemble" in records[0]
    assert result.stdout.count("final test top-1") == 2  # both ranks report the same reduced metrics


def diverging_from_epoch_two(monkeypatch) -> None:
    """From the second epoch on, the training images hold NaN (a bad data file): loss, gradient and weights follow."""
    real_step = engine.run_step

    def run_step(run, images, labels, index=None):
        if run.scheduler.last_epoch >= 3:  # TINY: 24 images, batch 8, 3 steps per epoch
            images = images * float("nan")
        return real_step(run, images, labels, index)

    monkeypatch.setattr(engine, "run_step", run_step)


def test_a_diverging_epoch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = replace(TINY, method="cekd", epochs=3, schedule="multistep", milestones=[9])
    good = train(replace(config, epochs=1), tmp_path / "run")  # epoch 1's checkpoint, then extend
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with monkeypatch.context() as patch:
        diverging_from_epoch_two(patch)
        with pytest.raises(
            engine.Diverged,
            match=r"^epoch 2 diverged: loss total, supervised, cross, ensemble went "
            r"non-finite; checkpoint.pt of epoch 1 is kept: --resume .*run "
            r"--clip-grad 5 continues from it",
        ):
            train(rundir.resumed_config(tmp_path / "run", epochs=3), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved  # untouched: no checkpoint of a bad epoch
    records = history(tmp_path / "run")
    assert records[0] == good and records[1]["epoch"] == 2
    assert records[1]["diverged"] == ["total", "supervised", "cross", "ensemble", "grad_norm"]
    # the last good state goes on, with what a resume may change after a divergence
    resumed = train(rundir.resumed_config(tmp_path / "run", epochs=3, clip_grad=5.0), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in history(tmp_path / "run")] == [1, 2, 3] and resumed["epoch"] == 3
    assert all(math.isfinite(v) for k, v in resumed.items() if k.startswith(("loss_", "top1_")))


def test_weights_that_overflow_with_finite_losses_are_caught(tmp_path, monkeypatch):
    """The last step of epoch 1 overflows a weight (its loss was finite): no checkpoint of that state."""
    real_step = engine.run_step

    def run_step(run, images, labels, index=None):
        parts = real_step(run, images, labels)
        if run.scheduler.last_epoch == 3:  # TINY: 3 steps per epoch
            with torch.no_grad():
                next(run.net.parameters()).mul_(float("inf"))
        return parts

    monkeypatch.setattr(engine, "run_step", run_step)
    with pytest.raises(
        engine.Diverged,
        match=r"^epoch 1 diverged: the weights went non-finite; no epoch finished: "
        r"start again with a lower --lr",
    ):
        train(replace(TINY, clip_grad=None), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert history(tmp_path / "run") == [
        {"epoch": 1, "diverged": ["weights"], "epoch_s": history(tmp_path / "run")[0]["epoch_s"]}
    ]
    monkeypatch.setattr(engine, "run_step", real_step)
    assert train(TINY, tmp_path / "run")["epoch"] == 1  # no dead end: the dir is reused


def test_a_run_says_what_it_trains_at_once_and_shows_progress_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "HEARTBEAT_S", 0.0)  # every batch is "slow": one progress line each
    train(replace(TINY, method="cekd", quiet=False), tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"training cekd over cutmix: 2 x timm:test_resnet, synthetic 4 classes, 24 train / 12 test images at "
        f"32 px, cpu ({torch.get_num_threads()} threads), 1 epochs of batch 8 -> {tmp_path / 'run'}"
    )
    assert [re.sub(r"\d+ s$", "T", line) for line in lines[1:4]] == [
        f"  epoch 1/1: {step}/3 batches, T" for step in (1, 2, 3)
    ]
    assert lines[4].startswith("epoch 1/1  loss total") and len(lines) == 5


def test_epoch_line_shows_skipped_fp16_steps():
    record = {"epoch": 2, "loss_total": 1.0, "top1_model": 50.0, "images_per_s": 10.0, "epoch_s": 3.0}
    assert "skipped" not in engine.epoch_line({**record, "skipped_steps": 0}, 5)
    assert engine.epoch_line({**record, "skipped_steps": 3}, 5).endswith("3 s  3 steps skipped (fp16 overflow)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_steps_the_scaler_skips_are_counted_not_taken_for_divergence(tmp_path, monkeypatch):
    real_build = engine.build_run

    def build_run(*args, **kwargs):  # a loss scale far too high: the first steps overflow in fp16 and are skipped
        run = real_build(*args, **kwargs)
        run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
        return run

    monkeypatch.setattr(engine, "build_run", build_run)
    record = train(replace(TINY, device="cuda", amp="fp16", train_per_class=40), tmp_path / "run")  # 20 steps
    assert 1 <= record["skipped_steps"] < 20 and math.isfinite(record["loss_total"])


def test_a_mix_list_chooses_per_sample_and_mixing_stops_after_its_epoch(tmp_path, monkeypatch):
    """--mix snapmix,mixup --switch-prob 0.25 --mix-off-epoch 2: the mixer chooses between the two with the
    probabilities timm's switch gives (the first 0.75), SnapMix gets its CAMs, and the third epoch's steps see
    clean batches."""
    seen = []
    real_step = engine.train_step

    def recording_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        seen.append((kwargs["step"], kwargs["mixer"], bool(out.batch.applied.any())))
        return out

    monkeypatch.setattr(engine, "train_step", recording_step)
    config = replace(TINY, method="cekd", mix="snapmix,mixup", switch_prob=0.25, mix_off_epoch=2, epochs=3)
    train(config, tmp_path / "run")
    mixer = seen[0][1]
    assert mixer.methods == ("snapmix", "mixup") and mixer.method_p == (0.75, 0.25) and mixer.p == config.mix_p
    steps_per_epoch = len(seen) // 3
    assert [applied for step, _, applied in seen if step >= 2 * steps_per_epoch] == [False] * steps_per_epoch
    assert any(applied for step, _, applied in seen if step < 2 * steps_per_epoch)


@pytest.mark.parametrize("every_view", [False, True])
def test_pcl_mean_model_j_sees_peer_js_view(every_view):
    """PCL's code runs mean model j on view j (N forwards); runs saved before do mean j on every view (N x N)."""
    models = [build_model("timm:test_resnet", 4, None, 32) for _ in range(2)]
    peers = methods.Peers("pcl", models, 4, None, 32, "own", every_view).eval()
    views = [torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    means = peers(views).mean_logits
    alone = [peers.means.model.members[j].eval()(views[j]) for j in range(2)]
    if every_view:
        assert means.shape == (2, 2, 3, 4)
        assert all(torch.allclose(means[j, j], alone[j], atol=1e-5) for j in range(2))
    else:
        assert means.shape == (2, 3, 4) and all(torch.allclose(means[j], alone[j], atol=1e-5) for j in range(2))


@pytest.mark.parametrize("method", ["one", "cekd"])
def test_snapmix_on_a_trunk_reads_its_cams_from_the_trunk_and_branch_0(method, tmp_path, monkeypatch):
    seen = []
    real_step = engine.train_step

    def recording_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        seen.append((kwargs["tap"], out.batch))
        return out

    monkeypatch.setattr(engine, "train_step", recording_step)
    train(replace(TINY, method=method, mix="snapmix", branches_from="layer3", mix_p=1.0), tmp_path / "run")
    tap, batch = seen[0]
    assert type(tap.model).__name__ == "TrunkMember" and batch.source_boxes is not None and batch.applied.any()


def test_pcl_on_a_trunk_gives_every_branch_its_own_view(tmp_path, monkeypatch):
    """--method pcl --branches-from layer3: the trunk runs once per view, branch i (and mean model i) on view i."""
    seen = []
    real_step = engine.train_step

    def recording_step(*args, **kwargs):
        seen.append(kwargs["views"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", recording_step)
    train(replace(TINY, method="pcl", branches_from="layer3", members=3), tmp_path / "run")
    assert seen[0] is not None and seen[0].views == 3
    legacy = replace(TINY, method="pcl", branches_from="layer3", pcl_legacy=True)
    assert methods.peer_views(legacy, torch.Generator()) is None


def test_mcl_remembers_every_training_image_and_resumes_with_its_memory(tmp_path):
    """MCL-OKD's memory: a row per training image, each row the trained images' (unit length, moved from its
    initial draw), kept in the checkpoint; a resumed run ends as an uninterrupted one."""
    config = replace(TINY, method="mcl", nce_k=16, epochs=2, schedule="multistep", milestones=[9])
    whole = train(config, tmp_path / "whole")
    memory = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]["contrast.memory"]
    assert memory.shape == (2, 24, 128) and torch.allclose(memory.norm(dim=2), torch.ones(2, 24), atol=1e-5)
    train(replace(config, epochs=1), tmp_path / "split")
    resumed = train(rundir.resumed_config(tmp_path / "split", epochs=2), tmp_path / "split", resume=True)
    assert resumed["top1_member0"] == whole["top1_member0"] and resumed["loss_contrast"] == whole["loss_contrast"]


def test_mcl_refuses_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "distributed_ranks", lambda device: (0, 2, 0))
    with pytest.raises(ValueError, match="--method mcl trains in one process"):
        train(replace(TINY, method="mcl"), tmp_path / "run")
