"""Shared fixtures: the devices to test on, and hypothesis profiles.

The suite is deterministic by default, for everyone and not only under CI: hypothesis draws the same
examples on every run (``derandomize=True``) and keeps no example database, so a failure seen once
cannot follow a clone around. To explore new inputs, opt in to the ``explore`` profile (random
draws, 300 examples per property, no database)::

    CEKD_HYPOTHESIS=explore pytest -q tests            # or: pytest --hypothesis-profile=explore
    CEKD_HYPOTHESIS=explore pytest -q --hypothesis-seed=7 tests
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The reproduction example is a package beside the library, not installed with it: its tests import it from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("deterministic", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("explore", max_examples=300, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("CEKD_HYPOTHESIS", "deterministic"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every available device: CPU always, CUDA when present."""
    return torch.device(request.param)
