"""The decode-step attention (one query position, fp32) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgemoe.models.attention import decode_attention


@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_decode_attention_matches_sdpa(heads, kv, dtype, scale):
    torch.manual_seed(0)
    S, D = 37, 16
    q = torch.randn(2, heads, 1, D).to(dtype)  # (B, heads, 1, D)
    k, v = torch.randn(2, kv, S, D).to(dtype), torch.randn(2, kv, S, D).to(dtype)  # (B, kv, S, D)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=heads != kv, scale=scale)
    out = decode_attention(q, k, v, None, scale)
    assert out.dtype == dtype and out.shape == (2, heads, 1, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_decode_attention_mask_hides_keys():
    """A sliding-window mask (1, S): masked keys get no weight, exactly as SDPA's bool mask."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 6:] = True  # only the last four positions
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask, None), ref, rtol=1e-5, atol=1e-6)
    # changing a hidden key changes nothing
    k2 = k.clone()
    k2[:, :, :6] = 100.0
    torch.testing.assert_close(decode_attention(q, k2, v, mask, None), ref, rtol=1e-5, atol=1e-6)
