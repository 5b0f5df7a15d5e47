"""Which CPU kernels torch's float matmuls take, and how to keep them inside a memory budget.

On CPUs with AVX-512 (BF16) or AMX, torch sends bf16/fp16 matmuls to oneDNN. Measured on
such a Xeon (edgemoe_lab/results/onednn_paths.md, 1024 x 5632 bf16 weight):

- at 1 row (a decode step) torch's native kernel takes 0.59-1.10x oneDNN's time, and a whole
  decode step of the benchmark model ran 1.47x faster on it (all experts in RAM);
- at 4 rows and more oneDNN is 4-14x faster (prefill: 6.5x end to end on that model);
- oneDNN keeps memory for every distinct (rows, in, out) shape it has seen: about 1.4 MB
  each, outside any allocator we manage. An MoE prefill gives every expert its own row
  count, so 400 distinct counts held 564 MB.

So: decode steps run with oneDNN switched off (`native_matmuls`), and every float matmul
of more than one row goes through `linear`, which pads the rows up to a power of two when
oneDNN will run it. oneDNN then sees at most ~10 row counts per weight shape, and what it
keeps stays below `ONEDNN_RESERVE`, which the offloaded runtime reserves inside the budget
(runtime/loading.py). The padding costs at most 2x the rows, far less than the 4-23x the
native kernel would cost. Small models (`prefill_onednn`) prefill on native kernels too:
the reserve would be larger than what oneDNN saves them. The choice depends on the model
alone, never on the budget, so an offloaded run computes exactly what the in-RAM run does.
On CPUs without these instructions (AVX2 only) torch's native kernels run everything and
none of this applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# What oneDNN keeps after running every power-of-two row count from 2 to 512 on a model's
# weight shapes, plus one weight's reorder buffer in flight: measured 6-14 MB on a
# 2-core AVX-512-BF16 Xeon (edgemoe_lab/results/onednn_paths.md), rounded up.
ONEDNN_RESERVE = 24 * 1000**2
# Below this many weight bytes a model prefills on native kernels (the bundled 14.7 MB model
# kept 20.5 MB in oneDNN over prompts of every length, more than its own weights).
ONEDNN_MIN_MODEL_BYTES = 10 * ONEDNN_RESERVE
_REDUCED = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=None)
def onednn_supported() -> bool:
    """Whether this CPU and torch build send bf16/fp16 matmuls to oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onednn_used(dtype: torch.dtype) -> bool:
    """Whether a matmul in `dtype` would run on oneDNN right now."""
    return dtype in _REDUCED and onednn_supported() and torch._C._get_mkldnn_enabled()


def prefill_onednn(requested: bool, dtype: torch.dtype, model_bytes: int) -> bool:
    """Whether prefill runs on oneDNN: asked for, this CPU sends `dtype` matmuls to it, and the
    model is large enough for the reserve to pay (see the module docstring)."""
    return requested and dtype in _REDUCED and onednn_supported() and model_bytes >= ONEDNN_MIN_MODEL_BYTES


def bucket_rows(n: int) -> int:
    """The padded row count oneDNN sees for n rows: the next power of two."""
    return 1 << (n - 1).bit_length()


_rows = threading.local()  # .fn: the matmul for decode steps of several sequences (row_matmul)


@contextlib.contextmanager
def row_matmul(fn):
    """Within the body, on this thread, `linear` first offers each matmul to fn(x, w, b),
    which returns the result or None to decline: edgemoe.batching's decode steps of several
    sequences hand them to a kernel whose cost hardly grows with the rows (edgemoe.rowmm)."""
    prev = getattr(_rows, "fn", None)
    _rows.fn = fn
    try:
        yield
    finally:
        _rows.fn = prev


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that gives oneDNN only power-of-two row counts (see the module docstring)."""
    fn = getattr(_rows, "fn", None)
    if fn is not None:
        out = fn(x, w, b)
        if out is not None:
            return out
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= 1 or not onednn_used(x.dtype):
        return F.linear(x, w, b)
    padded = bucket_rows(rows)
    if padded == rows:
        return F.linear(x, w, b)
    flat = x.reshape(rows, x.shape[-1])  # (R, in)
    out = F.linear(F.pad(flat, (0, 0, 0, padded - rows)), w, b)[:rows]  # (R, out)
    return out.reshape(*x.shape[:-1], w.shape[0])


class Linear(nn.Linear):
    """nn.Linear computed with `linear`; same parameters and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def native_matmuls(active: bool = True):
    """Run the body with oneDNN off (decode steps: torch's native matvec is faster and
    allocates nothing). The switch is process-wide; the previous setting comes back after."""
    if not active:
        yield
        return
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
