"""The file names of a directory written by `edgemoe convert`, and the one test for such a
directory. No imports beyond the standard library, so the CLI can use them before torch."""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
RESIDENT_NAME = "resident.safetensors"
STORE_NAME = "experts.bin"
CONVERTED_NAMES = (MANIFEST_NAME, STORE_NAME, RESIDENT_NAME)


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a directory written by `edgemoe convert`. Any one of its files marks
    it, so that one missing its manifest is reported as a damaged conversion, not read as a
    Hugging Face checkpoint."""
    return any((Path(path) / name).exists() for name in CONVERTED_NAMES)
