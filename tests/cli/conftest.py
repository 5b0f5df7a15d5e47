"""Fixtures for the command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import run_cli


@pytest.fixture(scope="session")
def converted_bundled(tmp_path_factory) -> Path:
    """The bundled model converted with 'edgemoe convert' (bf16 experts), once per session."""
    from edgemoe import assets

    out = tmp_path_factory.mktemp("converted") / "tiny-moe"
    proc = run_cli("convert", assets.MODEL_DIR, out, "-q")
    assert proc.returncode == 0, proc.stderr
    return out
