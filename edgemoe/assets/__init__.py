"""Data shipped with the package: the bundled tiny MoE and its evaluation texts.

- `MODEL_DIR`: a Hugging Face Mixtral directory (bf16 safetensors, byte-level BPE
  tokenizer with a chat template, `training.json` describing how it was made), trained
  from the Python standard library by `edgemoe train-tiny`. It is the default model of
  the demo and the tests; see docs/bundled-model.md for its quality and routing.
- `CALIB_TEXT`: calibration text (Python stdlib sources the model was not trained on),
  for profiling experts and choosing bitwidths.
- `HELDOUT_TEXT`: held-out evaluation text from a third, disjoint set of files.

Both texts are whole source files (long ones cut at a line end) joined by
`DOC_SEPARATOR`, the tokenizer's `<|endoftext|>` special token, which is also how the
training documents were separated. Read them with `read_documents`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
MODEL_DIR = ASSETS_DIR / "tiny-moe"
CALIB_TEXT = ASSETS_DIR / "calib.txt"
HELDOUT_TEXT = ASSETS_DIR / "heldout.txt"
DOC_SEPARATOR = "<|endoftext|>"


def read_documents(path: Path) -> list[str]:
    """The documents of a shipped text file, in order."""
    return Path(path).read_text(encoding="utf-8").split(DOC_SEPARATOR)


__all__ = ["ASSETS_DIR", "MODEL_DIR", "CALIB_TEXT", "HELDOUT_TEXT", "DOC_SEPARATOR", "read_documents"]
