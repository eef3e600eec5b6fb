"""What the reproduction's tests share: a tiny run, its command-line form, and readers of its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cekd_repro.config import RunConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TINY = RunConfig(
    classes=4,
    train_per_class=6,
    test_per_class=3,
    image_size=32,
    arch="timm:test_resnet",  # the tests are about the engine, not the network
    epochs=1,
    batch_size=8,
    lr=0.05,
    rampup_epochs=1,
    quiet=True,
)
TINY_ARGS = [
    "--classes",
    "4",
    "--train-per-class",
    "4",
    "--test-per-class",
    "2",
    "--image-size",
    "32",
    "--arch",
    "timm:test_resnet",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--quiet",
]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """examples/reproduce_cekd.py in a process of its own."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "reproduce_cekd.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
