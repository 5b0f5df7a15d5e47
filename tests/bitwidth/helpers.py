"""Helpers shared by the bitwidth-adaptation tests."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import CORPUS, save_checkpoint, tiny_config

# Expert shapes that the quantized formats take whole (hidden and intermediate are
# multiples of the group size), three layers of four experts.
SHAPE = dict(hidden_size=128, intermediate_size=128)
CONTEXT = 64


def make_hf(out: Path, tokenizer_dir: Path, seed: int = 0, dtype=torch.float32, family: str = "mixtral") -> Path:
    save_checkpoint(tiny_config(family, **SHAPE), out, tokenizer_dir, seed=seed, dtype=dtype)
    return out


def write_calib(path: Path) -> Path:
    """A calibration text for the tiny tokenizer (its training corpus, a few times)."""
    path.write_text(CORPUS * 2, encoding="utf-8")
    return path
