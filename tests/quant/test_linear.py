"""int8 linear layers for the resident weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgemoe.quant import kernels as K
from edgemoe.quant.linear import Int8Linear, quantize_linears_


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_int8_linear_matches_its_dequantized_weight(bias, tokens, monkeypatch):
    monkeypatch.setattr(K, "INT8_NATIVE_MAX_BATCH", 8)  # batch 33 takes the dequantize path
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU", 8)
    monkeypatch.setattr(K, "MATMUL_DTYPE", torch.float32)
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias).requires_grad_(False)
    q = Int8Linear.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32
    wd = q.dequantized()
    assert float((wd - lin.weight).abs().max()) <= float(q.scale.max()) / 2 * 1.001
    x = torch.randn(2, tokens, 96)
    want = x @ wd.t() + (lin.bias if bias else 0)
    got = q(x)
    assert got.shape == (2, tokens, 80)
    assert float((got - want).abs().max()) < 1e-4
    # bf16 model: bf16 scales, bf16 activations
    qb = Int8Linear.from_linear(lin.to(torch.bfloat16))
    yb = qb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    wantb = x.bfloat16().float() @ qb.dequantized().t() + (lin.bias.float() if bias else 0)
    assert float((yb.float() - wantb).abs().max() / wantb.abs().max()) < 2e-2


def test_quantize_linears_in_place_and_state_dict_round_trip():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 16, bias=False)))
    model.requires_grad_(False)
    x = torch.randn(5, 32)
    before = model(x)
    names = quantize_linears_(model, include=lambda name, layer: layer.out_features >= 16)
    assert names == ["0", "2.0"]
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    after = model(x)
    assert float((after - before).abs().max() / before.abs().max()) < 2e-2  # int8 error only
    state = model.state_dict()
    assert state["0.qweight"].dtype == torch.int8 and "2.0.bias" not in state
    fresh = nn.Sequential(Int8Linear(32, 64, bias=True, scale_dtype=torch.float32), nn.GELU(),
                          nn.Sequential(Int8Linear(64, 16, scale_dtype=torch.float32)))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), after)
