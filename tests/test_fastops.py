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


def torch_route(x, w, k, norm):
    logits = x @ w.t()  # (N, E) in x's dtype
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k,norm", [(8, 2, True), (64, 8, False), (16, 1, True)])
def test_route_softmax_matches_torch(dtype, E, k, norm):
    need_c()
    torch.manual_seed(3)
    x, w = torch.randn(5, 256).to(dtype), (torch.randn(E, 256) * 0.3).to(dtype)
    weights, ids, logits = fastops.route_softmax(x, w, k, norm)
    rw, rids, rlogits = torch_route(x, w, k, norm)
    assert weights.dtype == dtype and ids.dtype == torch.int64 and logits.shape == (5, E)
    # The gate's fp32 sums run in another order: a logit may move across a rounding boundary.
    torch.testing.assert_close(logits.float(), rlogits.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)
    for r in range(5):
        # The same experts unless torch's logits tie at the k-th place (which one it takes is its own).
        chosen, ref = logits[r].float(), rlogits[r].float()
        if len(set(ref.tolist())) == E and torch.equal(chosen, ref):
            assert torch.equal(ids[r], rids[r])
        assert torch.equal(weights[r], weights[r].sort(descending=True).values)  # descending
    torch.testing.assert_close(weights.float(), rw.float(), rtol=2e-2, atol=1e-3)
    if norm:
        torch.testing.assert_close(weights.float().sum(-1), torch.ones(5), rtol=2e-2, atol=0)


def test_route_softmax_hand_computed_and_ties_to_lower_id():
    """Logits 0, ln 3, ln 3, 0 (through an identity gate): probabilities 1/8, 3/8, 3/8, 1/8;
    top-2 are experts 1 and 2 (a tie: the lower id first), renormalised to 1/2 each."""
    need_c()
    x = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0))), float(torch.log(torch.tensor(3.0))), 0.0]])
    weights, ids, logits = fastops.route_softmax(x, torch.eye(4), 2, True)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]]))
    weights, ids, _ = fastops.route_softmax(x, torch.eye(4), 3, False)
    assert ids.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.375, 0.375, 0.125]]))


def test_route_softmax_rows_are_independent_and_declines():
    need_c()
    torch.manual_seed(4)
    x, w = torch.randn(6, 128).bfloat16(), torch.randn(16, 128).bfloat16()
    batch = fastops.route_softmax(x, w, 4, True)
    for r in range(6):
        one = fastops.route_softmax(x[r:r + 1].contiguous(), w, 4, True)
        assert all(torch.equal(a[r:r + 1], b) for a, b in zip(batch, one))
    assert fastops.route_softmax(torch.randn(65, 128).bfloat16(), w, 4, True) is None  # prefill: torch's ops
    assert fastops.route_softmax(x, w.float(), 4, True) is None  # mixed dtypes
    assert fastops.route_softmax(x.requires_grad_(), w, 4, True) is None  # autograd needs the torch ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("H", [300, 48, 2048])
def test_combine_is_the_torch_expression_bit_for_bit(dtype, k, H):
    need_c()
    torch.manual_seed(5)
    slots = (torch.randn(k, H) * 50).to(dtype)
    if dtype == torch.float32 and k > 4:  # torch sums some columns of these in another order
        assert fastops.combine(slots, torch.rand(1, k)) is None
        return
    slots[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    weights = torch.rand(1, k).to(dtype)
    ref = (slots.view(1, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # MoEBlock's torch lines
    got = fastops.combine(slots, weights)
    assert got.shape == (1, H) and torch.equal(got.nan_to_num(0.5), ref.nan_to_num(0.5))
    residual = torch.randn(1, 1, H).to(dtype)
    got = fastops.combine(slots, weights, residual)
    assert got.shape == residual.shape
    assert torch.equal(got.nan_to_num(0.5), (residual + ref.reshape(1, 1, -1)).nan_to_num(0.5))
