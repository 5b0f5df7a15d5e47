"""What a model path is: the file names of a directory written by `edgemoe convert` and the
one test for such a directory, and the test for a GGUF file. No imports beyond the
standard library and edgemoe.errors, so the CLI and the checkpoint reader can use them
before torch and without importing the store."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
RESIDENT_NAME = "resident.safetensors"
STORE_NAME = "experts.bin"
CONVERTED_NAMES = (MANIFEST_NAME, STORE_NAME, RESIDENT_NAME)
GGUF_MAGIC = b"GGUF"


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a directory written by `edgemoe convert`. Any one of its files marks
    it, so that one missing its manifest is reported as a damaged conversion, not read as a
    Hugging Face checkpoint."""
    return any((Path(path) / name).exists() for name in CONVERTED_NAMES)


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file: a name ending in .gguf that is not a directory
    (existing or not, so that a missing one is reported as a missing file), or a file
    starting with the GGUF magic. Cheap (reads 4 bytes); does not import the gguf package."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return True
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_load_error(path: str | Path) -> ModelLoadError:
    """The error for running a GGUF file directly (`edgemoe generate MODEL.gguf`)."""
    return ModelLoadError(f"{path}: a GGUF file; convert it first: edgemoe convert {path} OUT_DIR, "
                          "then run edgemoe generate OUT_DIR")


def check_not_gguf(path: str | Path) -> None:
    """Raise `gguf_load_error` if `path` is a GGUF file (for loaders of converted models)."""
    if is_gguf(path):
        raise gguf_load_error(path)
