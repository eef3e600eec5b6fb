"""torchvision's own tests of MixUp and CutMix, run with torchvision's classes and then with this library's.

Usage: ``python benchmarks/torchvision_suite.py PATH`` where PATH is torchvision's ``test/test_transforms_v2.py``
(a checkout of pytorch/vision, or any file holding its ``TestCutMixMixUp`` class). The class is read from the file
and run unchanged, twice: once with ``transforms.MixUp`` / ``CutMix`` as torchvision's, once as
:class:`cekd_losses.MixUp` / :class:`cekd_losses.CutMix`, every other name as torchvision's. The names the class
takes from torchvision's ``common_utils`` are stood in for: ``needs_cuda`` skips without CUDA, and the CUDA-vs-CPU
helper skips its test (this harness does not reproduce it). The last line says how many of the tests that
torchvision's own classes pass pass with ours.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HEADER = """import types

import pytest
import torch
import torchvision.transforms.v2 as _torchvision_transforms
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

transforms = types.SimpleNamespace(**vars(_torchvision_transforms))
if {ours}:
    import cekd_losses

    transforms.MixUp, transforms.CutMix = cekd_losses.MixUp, cekd_losses.CutMix
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_kernel_cuda_vs_cpu(*args, **kwargs):
    pytest.skip("torchvision's CUDA-vs-CPU helper (its common_utils) is not reproduced by this harness")


"""


def test_class_source(path: Path, name: str = "TestCutMixMixUp") -> str:
    """The source of the class ``name`` in the file at ``path``."""
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            source = ast.get_source_segment(text, node)
            assert source is not None
            decorators = [ast.get_source_segment(text, d) for d in node.decorator_list]
            return "".join(f"@{d}\n" for d in decorators) + source
    raise SystemExit(f"{path}: no class {name} in it (pass torchvision's test/test_transforms_v2.py)")


def outcomes(directory: Path, module: str) -> dict[str, str]:
    """pytest's outcome of each test of ``module`` by its name: "passed", "skipped", or "failed: " and the
    failure's message."""
    report = directory / f"{module}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", module]
    subprocess.run(command, cwd=directory, check=False, capture_output=True)
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        children = {child.tag: child for child in case}
        failure = children.get("failure", children.get("error"))
        if failure is not None:
            results[case.get("name", "?")] = "failed: " + " ".join((failure.get("message") or "").split())[:150]
        else:
            results[case.get("name", "?")] = "skipped" if "skipped" in children else "passed"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="torchvision's test/test_transforms_v2.py")
    args = parser.parse_args()
    if not args.path.is_file():
        raise SystemExit(f"{args.path}: no such file (pass torchvision's test/test_transforms_v2.py)")
    source = test_class_source(args.path)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for module, ours in (("test_theirs.py", False), ("test_ours.py", True)):
            (directory / module).write_text(HEADER.format(ours=ours) + source + "\n")
        theirs, ours = outcomes(directory, "test_theirs.py"), outcomes(directory, "test_ours.py")
    for name in sorted(theirs):
        print(f"{name}\n    torchvision: {theirs[name]}\n    ours:        {ours.get(name, 'missing')}")
    passed = [name for name, outcome in theirs.items() if outcome == "passed"]
    both = [name for name in passed if ours.get(name) == "passed"]
    print(
        f"torchvision's own classes pass {len(passed)}/{len(theirs)}; "
        f"ours {len(both)}/{len(passed)} of the tests torchvision's own classes pass"
    )


if __name__ == "__main__":
    main()
