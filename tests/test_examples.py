"""The examples users copy run as shipped (on the installed package, with few steps).

Each runs in this process as ``python examples/<script> ...`` would run it (``runpy`` as ``__main__``, its
arguments in ``sys.argv``, the current directory a fresh one): a new interpreter would add 4-5 s of imports per
script on a 2-core machine and test nothing more. The command line's own process is tested in test_repro_cli.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``run(script, *args)``: the script's stdout, run in ``tmp_path`` with the torch RNG restored after."""

    def run_script(script: str, *args: str) -> str:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *args])
        capsys.readouterr()
        with torch.random.fork_rng():
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
        return capsys.readouterr().out

    return run_script


@pytest.mark.parametrize("script", ["quickstart_torchvision.py", "quickstart_timm.py"])
def test_quickstart_runs(script, run):
    out = run(script, "--steps", "2")
    assert out.count("step ") == 2


def test_mixing_demo_prints_every_method_and_writes_a_png(run, tmp_path):
    out = run("demo_mixing.py", "--batch", "8")
    for method in ("mixup", "cutmix", "snapmix"):
        assert method in out
    assert (tmp_path / "runs" / "demo_mixing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # not beside the code


def test_kornia_pipeline_example_mixes_after_kornias_augmentations_and_writes_a_png(run, tmp_path):
    out = run("kornia_pipeline.py", "--batch", "6", "--size", "64")
    assert (
        "RandomCutMix rows" in out and "RandomSnapMix rows" in out and "MixingAugmenter: images (6, 3, 64, 64)" in out
    )
    assert (tmp_path / "runs" / "kornia_pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_family_example_trains_every_method(run):
    out = run("online_family.py", "--steps", "2")
    lines = out.splitlines()
    expected = {
        "dml": ["supervised", "peers"],
        "one": ["supervised", "teacher"],
        "ffl": ["supervised", "teacher", "to_teacher"],
        "pcl": ["supervised", "teacher", "mean_teachers"],
        "mcl": ["supervised", "mean_to_last", "contrast"],
        "cekd": ["supervised", "peers", "teacher"],
    }
    for line, (method, terms) in zip(lines, expected.items(), strict=False):
        assert line.split()[0] == method
        assert line.split()[1::2] == ["total", *terms]
    assert lines[-1].startswith("every method trained")


def test_the_online_familys_pcl_means_carry_no_taps_and_keep_their_own_statistics():
    """The mean models are copied before the linear combiner taps the peers (a copy would carry the hooks), and
    keep BatchNorm statistics of their own, as PCL's code."""
    import timm

    sys.path.insert(0, str(EXAMPLES))
    try:
        import online_family
    finally:
        sys.path.remove(str(EXAMPLES))
    model = online_family.PeersWithMeans([timm.create_model("test_resnet", num_classes=10) for _ in range(2)])
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.means.modules())
    assert hooks == 0 and all(mean.buffers_rule == "own" for mean in model.means)
    assert sum(len(m._forward_pre_hooks) for m in model.ensemble.modules()) > 0  # the combiner's taps are there
