"""Every example in the public docstrings runs and prints what it shows, and every Python block of the README and
of the docs runs as a reader would paste it: on CPU, a page's blocks in order in one session."""

from __future__ import annotations

import doctest
import functools
import re
from pathlib import Path

import pytest
import torch

import cekd_losses._constants
import cekd_losses._terms
import cekd_losses.cam
import cekd_losses.contrastive
import cekd_losses.draws
import cekd_losses.ensemble
import cekd_losses.fusion
import cekd_losses.gate
import cekd_losses.kernels
import cekd_losses.kornia_mix.cutmix
import cekd_losses.kornia_mix.mixup
import cekd_losses.kornia_mix.snapmix
import cekd_losses.kornia_mix.soft_targets
import cekd_losses.losses
import cekd_losses.mean_teacher
import cekd_losses.mixed_batch
import cekd_losses.mixing
import cekd_losses.objective
import cekd_losses.online
import cekd_losses.step
import cekd_losses.timm_mix
import cekd_losses.torchvision_mix
import cekd_losses.trunk
import cekd_losses.views

MODULES = [
    cekd_losses._constants,
    cekd_losses._terms,
    cekd_losses.mixed_batch,
    cekd_losses.kernels,
    cekd_losses.draws,
    cekd_losses.mixing,
    cekd_losses.cam,
    cekd_losses.contrastive,
    cekd_losses.losses,
    cekd_losses.ensemble,
    cekd_losses.fusion,
    cekd_losses.gate,
    cekd_losses.objective,
    cekd_losses.step,
    cekd_losses.timm_mix,
    cekd_losses.torchvision_mix,
    cekd_losses.kornia_mix.mixup,
    cekd_losses.kornia_mix.cutmix,
    cekd_losses.kornia_mix.snapmix,
    cekd_losses.kornia_mix.soft_targets,
    cekd_losses.mean_teacher,
    cekd_losses.online,
    cekd_losses.trunk,
    cekd_losses.views,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]


def python_blocks(page: Path) -> list[str]:
    """The Python blocks of a Markdown (```python fences) or reStructuredText (``.. code-block:: python``) page."""
    text = page.read_text()
    if page.suffix == ".md":
        return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, flags=re.M):
        lines = match.group(1).rstrip().splitlines()
        blocks.append("\n".join(line[4:] for line in lines) + "\n")
    return blocks


def test_the_pages_have_their_python_blocks():
    """The extraction itself: the pages that show code give their blocks (a changed fence would hide them)."""
    counts = {page.name: len(python_blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 1 and counts["quickstart.rst"] >= 7 and counts["kornia.rst"] >= 2


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_of_a_page_runs(page, tmp_path, monkeypatch):
    """A block that compiles is traced whole by dynamo, with the eager backend: inductor's code generation (a
    cold compile costs 15-20 s on 2 cores) is tested on the same mixer in test_launch_floor.py."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    session: dict[str, object] = {"__name__": "__main__"}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for number, block in enumerate(python_blocks(page), start=1):
            exec(compile(block, f"{page.name} block {number}", "exec"), session)  # noqa: S102
