"""The fused decode call of an attention half (Attention.decode_half, one C call) gives the
module-by-module path's results bit for bit, and declines what it cannot take."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from edgemoe.models.attention import Attention
from edgemoe.quant import native
from edgemoe.quant.linear import FLOAT_LINEARS, Int4Linear, Int8Linear


def need_c():
    if native.get() is None:
        pytest.skip(f"C kernel unavailable: {native.library.error}")


def quantized(path, kind: str, dtype: torch.dtype):
    """The model at `path` in RAM with its attention projections as int4 or int8 layers."""
    model = edgemoe.load(path, dtype="float32" if dtype == torch.float32 else "bfloat16").model
    for attn in (m for m in model.modules() if type(m) is Attention):
        for name in ("q", "k", "v", "o"):
            lin = getattr(attn, name)
            assert type(lin) in FLOAT_LINEARS
            setattr(attn, name, (Int4Linear if kind == "int4" else Int8Linear).from_linear(lin))
    return model


def decode(model, ids: list[int], fused: bool) -> list[torch.Tensor]:
    """Logits of a prefill then one-token steps, with the fused attention half on or off."""
    for attn in (m for m in model.modules() if type(m) is Attention):
        attn._half = None if fused else False
    cache = model.make_cache(64)
    out = []
    with torch.inference_mode():
        out.append(model(torch.tensor([ids[:5]]), cache, last_only=True)[0, -1])
        for t in ids[5:]:
            out.append(model(torch.tensor([[t]]), cache)[0, -1])
    return out


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_half_is_bit_identical(tiny_mixtral, kind, dtype):
    need_c()
    model = quantized(tiny_mixtral, kind, dtype)
    ids = [3, 17, 99, 5, 250, 8, 41, 77, 12, 300, 6]
    calls = []
    for attn in (m for m in model.modules() if type(m) is Attention):
        orig = attn.decode_half
        attn.decode_half = lambda *a, _o=orig: calls.append(r := _o(*a)) or r
    fused, plain = decode(model, ids, True), decode(model, ids, False)
    assert sum(c is not None for c in calls) == 6 * 3  # every decode step of every layer took the C call
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_fused_attention_half_declines_float_layers(tiny_mixtral):
    need_c()
    model = edgemoe.load(tiny_mixtral, dtype="float32").model
    attn = next(m for m in model.modules() if type(m) is Attention)
    cache = model.make_cache(16)
    x = torch.randn(1, 1, attn.spec.hidden)
    layer = model.layers[0]
    assert attn.decode_half(x, layer.norm1, cache[0]) is None and cache[0].offset == 0  # float q/k/v/o: torch's matmuls


def test_fused_attention_half_follows_the_activation_setting(tiny_mixtral):
    """Descriptions made under int8 activations are made again after set_activations: both
    paths then run the int16 kernels, still bit for bit alike (and unlike before)."""
    need_c()
    from edgemoe.quant import kernels

    model = quantized(tiny_mixtral, "int4", torch.float32)
    ids = [3, 17, 99, 5, 250, 8, 41, 77]
    act8 = decode(model, ids, True)
    prev = kernels.set_activations("int16")
    try:
        fused, plain = decode(model, ids, True), decode(model, ids, False)
    finally:
        kernels.set_activations(prev)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert not torch.equal(fused[-1], act8[-1])
