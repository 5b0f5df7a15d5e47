"""int4 linear layers for the resident weights (Int4Linear): the experts' int4 layout
behind an nn.Linear, both kernel paths, and its state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgemoe.quant import kernels as K
from edgemoe.quant.linear import INT4_SPEC, Int4Linear
from edgemoe.quant.quantize import pack, quantize


def _layer(k: int, n: int, bias: bool, seed: int = 0) -> tuple[nn.Linear, Int4Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
    return lin, Int4Linear.from_linear(lin)


def test_codes_are_the_experts_int4_layout():
    lin, q = _layer(100, 24, bias=False)  # K = 100: padded to two groups of 64, as experts are
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (24, 64)  # (N, Kp/2)
    assert q.qscale.dtype == torch.float16 and q.qscale.shape == (24, 2)  # (N, Kp/G)
    qz = quantize(lin.weight, INT4_SPEC, search=True)
    assert torch.equal(q.qweight, pack(qz.q, 4)) and torch.equal(q.qscale, qz.scale)
    wd = q.dequantized()
    assert wd.shape == (24, 100)
    # every weight within half a step of its level (the search may clip a few outliers per group)
    step = q.qscale.float().repeat_interleave(64, dim=1)[:, :100]  # (N, K)
    assert float(((wd - lin.weight).abs() / step).median()) < 0.5
    assert q.nbytes == 24 * 64 + 24 * 2 * 2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("k", [192, 100])  # 100: padded to 128 as experts are
def test_int4_linear_matches_its_dequantized_weight(bias, tokens, k, monkeypatch):
    # batch 40 > packed_max_batch (8 here): the dequantize + matmul path, in fp32 so the
    # comparison is tight; batch 1: the packed C kernel (or torch's fallback without it).
    monkeypatch.setattr(K, "PACKED_MAX_BATCH", 8)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU", 8)
    monkeypatch.setattr(K, "PACKED_MAX_BATCH_BF16_CPU_INT16", 8)
    monkeypatch.setattr(K, "MATMUL_DTYPE", torch.float32)
    lin, q = _layer(k, 80, bias)
    wd = q.dequantized()
    x = torch.randn(2, tokens, k)
    want = x @ wd.t() + (lin.bias if bias else 0)  # (2, T, 80)
    prev = K.set_activations("int16")  # int16 activations: the kernel's own rounding is ~1e-5
    try:
        got16 = q(x)
    finally:
        K.set_activations(prev)
    assert got16.shape == (2, tokens, 80)
    assert float((got16 - want).abs().max() / want.abs().max()) < 1e-3
    got8 = q(x)  # the default: int8 activations, one scale per 64 (about 1/254 of each group's max)
    assert float((got8 - want).abs().max() / want.abs().max()) < 2e-2
    if tokens > 8:
        assert float((got8 - want).abs().max() / want.abs().max()) < 1e-4  # the dequantize path does not round x
    # bf16 model: bf16 activations and output
    qb = Int4Linear.from_linear(lin.to(torch.bfloat16))
    yb = qb(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and (qb.bias is None or qb.bias.dtype == torch.bfloat16)
    wantb = x.bfloat16().float() @ qb.dequantized().t() + (lin.bias.float() if bias else 0)
    assert float((yb.float() - wantb).abs().max() / wantb.abs().max()) < 3e-2


def test_int4_close_to_the_float_layer():
    lin, q = _layer(256, 64, bias=True)
    x = torch.randn(5, 256)
    ref = lin(x)
    err = float((q(x) - ref).abs().max() / ref.abs().max())
    assert 1e-3 < err < 0.1  # 4-bit rounding of the weights: visible, but a few percent


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False)).requires_grad_(False)
    model[0] = Int4Linear.from_linear(model[0])
    model[2] = Int4Linear.from_linear(model[2])
    x = torch.randn(3, 64)
    y = model(x)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    state = load_file(tmp_path / "m.safetensors")
    assert state["0.qweight"].dtype == torch.uint8 and state["2.qscale"].dtype == torch.float16
    assert "2.bias" not in state
    with torch.device("meta"):
        fresh = nn.Sequential(Int4Linear(64, 96, bias=True, bias_dtype=torch.float32), nn.GELU(),
                              Int4Linear(96, 32))
    fresh.load_state_dict(state, assign=True)
    assert torch.equal(fresh(x), y)
