"""References the kernel tests compare against: the dequantize-matmul in float64, and
the int8 activations exactly as the int8 path quantizes them (csrc/qmm8.c)."""

from __future__ import annotations

import torch


def act8(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x (M, K) as the int8 path sees it: per block of `block` activations (zero padded),
    xs = absmax / 127 and q = round-half-even(x * (127 / absmax)), all in float32; returns
    q * xs (M, K). The kernel's integer sums are exact, so it matches this within float
    rounding of the final sums."""
    m, k = x.shape
    kp = -(-k // block) * block
    xp = torch.zeros(m, kp)
    xp[:, :k] = x.float()
    xb = xp.view(m, kp // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    assert q.abs().max() <= 127
    return (q * (amax / torch.tensor(127.0))).view(m, kp)[:, :k]


def act8_step(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The int8 step of every activation of x (M, K) as act8 quantizes it: absmax / 127 of
    its block (zero padded)."""
    m, k = x.shape
    kp = -(-k // block) * block
    xp = torch.zeros(m, kp)
    xp[:, :k] = x.float()
    amax = xp.view(m, kp // block, block).abs().amax(-1)  # (M, Kp / block)
    return (amax / 127).repeat_interleave(block, dim=1)[:, :k]


def rel_err(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor) -> float:
    """Largest |y - x @ wd^T| relative to |x| @ |wd|^T (the scale of each sum)."""
    ref = x.double() @ wd.double().t()
    bound = x.double().abs() @ wd.double().abs().t()
    return float(((y.double() - ref).abs() / (bound + 1e-30)).max())


def assert_matches(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, rtol: float):
    """y within rtol of x @ wd^T, relative to |x| @ |wd|^T (the scale of each sum)."""
    ref = x.double() @ wd.double().t()
    bound = x.double().abs() @ wd.double().abs().t()
    err = (y.double() - ref).abs()
    assert bool((err <= rtol * bound + 1e-6).all()), float((err / bound).max())


# Tolerances, relative to |x| @ |w|: int16 activations against the float reference (their
# rounding, ~1e-5 of each sum); int8 ones against act8's activations (only the float
# rounding of the final sums, which the integer arithmetic leaves exact).
RTOL_INT16 = 5e-4
RTOL_INT8_EXACT = 2e-6


def check_path(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, act: str, block: int = 64):
    """A packed-kernel result against the reference of its activation path."""
    if act == "int8":
        assert_matches(y, act8(x, block), wd, RTOL_INT8_EXACT)
    else:
        assert_matches(y, x, wd, RTOL_INT16)
