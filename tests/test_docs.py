"""Every example in the public docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest

import pytest
import torch

import cekd_losses.cam
import cekd_losses.ensemble
import cekd_losses.fusion
import cekd_losses.gate
import cekd_losses.kornia_mix
import cekd_losses.losses
import cekd_losses.mean_teacher
import cekd_losses.mixing
import cekd_losses.objective
import cekd_losses.online
import cekd_losses.step
import cekd_losses.trunk
import cekd_losses.views

MODULES = [
    cekd_losses.mixing,
    cekd_losses.cam,
    cekd_losses.losses,
    cekd_losses.ensemble,
    cekd_losses.fusion,
    cekd_losses.gate,
    cekd_losses.objective,
    cekd_losses.step,
    cekd_losses.kornia_mix,
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
