"""`edgemoe convert --resident int8`: resident linear layers stored as int8, recorded in
the manifest (version 2), loaded by the runtime, close to the float model."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from edgemoe.errors import EdgeMoEError, StoreError
from edgemoe.quant.linear import Int8Linear
from edgemoe.store.manifest import read_manifest

from store.helpers import PROMPTS, edit_manifest, make_checkpoint, make_converted, offloaded_prompts, run_prompts


@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral"])
def stores(request, tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp(f"int8-{request.param}")
    hf = make_checkpoint(d / "hf", request.param, tokenizer_dir)
    return request.param, hf, make_converted(hf, d / "float"), make_converted(hf, d / "int8", resident="int8")


def test_manifest_records_the_int8_layers(stores):
    family, hf, flt, q8 = stores
    m, f = read_manifest(q8), read_manifest(flt)
    assert m.version == 2 and f.version == 1 and f.resident_int8 == []
    names = set(m.resident_int8)
    assert {"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.0.attn.o", "lm_head"} <= names
    if family == "qwen2_moe":
        assert {"layers.0.mlp.shared.gate", "layers.0.mlp.shared.up", "layers.0.mlp.shared.down"} <= names
        assert "layers.0.mlp.shared_gate" not in names  # one-row gate stays float
        assert "layers.0.attn.q.bias" in m.resident_tensors  # biases kept next to the int8 codes
    assert not any("router" in n or "embed" in n or "norm" in n for n in names)
    for n in names:
        assert f"{n}.qweight" in m.resident_tensors and f"{n}.scale" in m.resident_tensors
        assert f"{n}.weight" not in m.resident_tensors
    assert m.resident_bytes < 0.6 * f.resident_bytes  # int8 codes + scales vs fp32 weights
    assert m.store_bytes == f.store_bytes  # experts untouched


def test_int8_resident_runs_close_to_float(stores):
    family, hf, flt, q8 = stores
    a, b = edgemoe.load(flt, mode="io-free"), edgemoe.load(q8, mode="io-free")
    try:
        assert any(isinstance(m, Int8Linear) for m in b.model.modules())
        assert not any(isinstance(m, Int8Linear) for m in a.model.modules())
        x = torch.tensor([PROMPTS[0]])
        la, lb = a.model(x).float(), b.model(x).float()
        assert float((la - lb).abs().max() / la.abs().max()) < 0.05  # int8 rounding only
        assert not torch.equal(la, lb)
        assert b.info["resident_bytes"] < a.info["resident_bytes"]
        want = run_prompts(b)
    finally:
        a.close()
        b.close()
    # Offloaded with a small cache: the same tokens as everything in RAM.
    assert offloaded_prompts(q8) == want


def test_bad_int8_layer_names_are_refused(stores, tmp_path):
    family, hf, flt, q8 = stores
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(q8, copy)
    edit_manifest(copy, lambda d: d["resident"]["int8"].append("layers.0.attn.nope"))
    with pytest.raises(StoreError, match="layers.0.attn.nope"):
        edgemoe.load(copy)


def test_bad_resident_option(stores, tmp_path):
    _, hf, _, _ = stores
    with pytest.raises(EdgeMoEError, match="resident weights format"):
        make_converted(hf, tmp_path / "x", resident="int2")
