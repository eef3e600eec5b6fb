"""The examples users copy run as shipped (on the installed package, with few steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("script", ["quickstart_torchvision.py", "quickstart_timm.py"])
def test_quickstart_runs(script, tmp_path):
    out = run(script, "--steps", "2", cwd=tmp_path)
    assert out.count("step ") == 2


def test_mixing_demo_prints_every_method_and_writes_a_png(tmp_path):
    out = run("demo_mixing.py", "--batch", "8", cwd=tmp_path)
    for method in ("mixup", "cutmix", "snapmix"):
        assert method in out
    assert (tmp_path / "runs" / "demo_mixing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # not beside the code


def test_kornia_pipeline_example_mixes_after_kornias_augmentations_and_writes_a_png(tmp_path):
    out = run("kornia_pipeline.py", "--batch", "6", "--size", "64", cwd=tmp_path)
    assert (
        "RandomCutMix rows" in out and "RandomSnapMix rows" in out and "MixingAugmenter: images (6, 3, 64, 64)" in out
    )
    assert (tmp_path / "runs" / "kornia_pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_family_example_trains_every_method(tmp_path):
    out = run("online_family.py", "--steps", "2", cwd=tmp_path)
    lines = out.splitlines()
    expected = {
        "dml": ["supervised", "peers"],
        "one": ["supervised", "teacher"],
        "ffl": ["supervised", "teacher", "to_teacher"],
        "pcl": ["supervised", "teacher", "mean_teachers"],
        "cekd": ["supervised", "peers", "teacher"],
    }
    for line, (method, terms) in zip(lines, expected.items(), strict=False):
        assert line.split()[0] == method
        assert line.split()[1::2] == ["total", *terms]
    assert lines[-1].startswith("every method trained")
