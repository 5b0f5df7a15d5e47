"""The set-up in the Makefile: torch pinned and installed first, and TORCH_INDEX picks
PyTorch's CPU wheel index (from PyPI alone torch==2.13.0 is the multi-GB CUDA build)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*extra: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "-B", ".venv/.installed", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [l for l in proc.stdout.splitlines() if "pip install" in l]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_torch_first_and_the_cpu_index_is_optional():
    plain = dry_run()
    assert "torch==2.13.0" in plain[1] and "--index-url" not in plain[1]
    assert "-e '.[test]'" in plain[2]  # the package after torch, so a bare torch requirement never pulls CUDA
    cpu = dry_run("TORCH_INDEX=https://example.invalid/whl/cpu")
    assert cpu[1].endswith("torch==2.13.0 --index-url https://example.invalid/whl/cpu")
    assert "--index-url" not in cpu[2]  # only torch comes from that index
