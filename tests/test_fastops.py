"""edgemoe.fastops: the C decode-step ops against their torch versions."""

from __future__ import annotations

import pytest
import torch

from edgemoe import fastops
from edgemoe.models.attention import KVCache, decode_attention
from edgemoe.quant import native


def need_c():
    if native.get() is None:
        pytest.skip(f"C kernel unavailable: {native.library.error}")


def torch_rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,H", [(1, 2048), (3, 96), (1, 7)])
def test_rms_norm_matches_torch(dtype, rows, H):
    need_c()
    torch.manual_seed(0)
    x, w = (torch.randn(rows, H) * 3).to(dtype), torch.randn(H).to(dtype)
    got, ref = fastops.rms_norm(x, w, 1e-5), torch_rms(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    else:  # the fp32 sum's order may move a value across a bf16 rounding boundary: one ulp at most
        ulp = ref.float().abs().clamp_min(1e-30) * 2**-7
        assert ((got.float() - ref.float()).abs() <= ulp * 1.01).all()
        assert (got == ref).float().mean() > 0.97


def test_rms_norm_rows_are_independent():
    """A batched decode step normalises each row as a one-row step would (same tokens)."""
    need_c()
    torch.manual_seed(1)
    x, w = torch.randn(5, 1, 64).bfloat16(), torch.randn(64).bfloat16()
    batch = fastops.rms_norm(x, w, 1e-6)
    for b in range(5):
        assert torch.equal(batch[b], fastops.rms_norm(x[b].contiguous(), w, 1e-6))


def test_rms_norm_mixed_dtypes_fall_back_to_torch():
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(16)  # fp32 weight: torch's type promotion
    assert torch.equal(fastops.rms_norm(x, w, 1e-6), torch_rms(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv,scale", [(8, 2, None), (4, 4, 0.2), (6, 1, None)])
def test_attend_one_matches_decode_attention(dtype, heads, kv, scale):
    need_c()
    torch.manual_seed(2)
    D, steps = 16, 40
    fast, ref = KVCache(capacity=64), KVCache()
    for t in range(steps):
        q = torch.randn(1, heads, 1, D).to(dtype)  # (1, heads, 1, D)
        k, v = torch.randn(1, kv, 1, D).to(dtype), torch.randn(1, kv, 1, D).to(dtype)  # (1, kv, 1, D)
        got = fast.attend_one(q, k, v, scale)
        assert got is not None and fast.offset == t + 1
        kk, vv = ref.update(k, v)
        want = decode_attention(q, kk, vv, None, scale)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(fast.k[:, :, :steps], ref.k[:, :, :steps])  # the appended keys and values, exactly
    assert torch.equal(fast.v[:, :, :steps], ref.v[:, :, :steps])


def test_attend_one_declines_what_it_cannot_take():
    need_c()
    cache = KVCache(capacity=8)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)  # batch of 2
    assert cache.attend_one(q, k, v, None) is None and cache.offset == 0
    q16 = torch.randn(1, 4, 1, 8).half()
    assert cache.attend_one(q16, k[:1].half(), v[:1].half(), None) is None and cache.offset == 0
