"""`edgemoe convert --resident int4`: resident linear layers stored as the experts' int4
layout, recorded in the manifest (version 6), loaded by the runtime, close to the float
model; offloaded runs give the in-RAM tokens; bad names and options are refused."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import edgemoe
from edgemoe.cli.bench import build_parser as bench_parser
from edgemoe.cli.convert import build_parser as convert_parser
from edgemoe.errors import StoreError
from edgemoe.quant import kernels as K
from edgemoe.quant.linear import Int4Linear, Int8Linear
from edgemoe.store.manifest import read_manifest

from store.helpers import PROMPTS, edit_manifest, make_checkpoint, make_converted, offloaded_prompts, run_prompts


@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral"])
def stores(request, tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp(f"int4-{request.param}")
    hf = make_checkpoint(d / "hf", request.param, tokenizer_dir)
    return (request.param, hf, make_converted(hf, d / "float"), make_converted(hf, d / "int8", resident="int8"),
            make_converted(hf, d / "int4", resident="int4"))


def test_manifest_records_the_int4_layers(stores):
    family, hf, flt, q8, q4 = stores
    m, m8 = read_manifest(q4), read_manifest(q8)
    assert m.version == 6 and m.resident_int8 == [] and m8.resident_int4 == []
    assert m.resident_int4 == m8.resident_int8  # the same layers as int8
    names = set(m.resident_int4)
    assert {"layers.0.attn.q", "layers.0.attn.o", "lm_head"} <= names
    if family == "qwen2_moe":
        assert "layers.0.mlp.shared_gate" not in names and "layers.0.attn.q.bias" in m.resident_tensors
    assert not any("router" in n or "embed" in n or "norm" in n for n in names)
    for n in names:
        assert {f"{n}.qweight", f"{n}.qscale"} <= set(m.resident_tensors) and f"{n}.weight" not in m.resident_tensors
    assert m.resident_bytes < read_manifest(q8).resident_bytes
    assert m.store_bytes == read_manifest(flt).store_bytes  # experts untouched


def test_int4_resident_runs_close_to_float(stores):
    family, hf, flt, q8, q4 = stores
    a, b = edgemoe.load(flt, mode="io-free"), edgemoe.load(q4, mode="io-free")
    try:
        layers = [m for m in b.model.modules() if isinstance(m, Int4Linear)]
        assert layers and not any(isinstance(m, (Int4Linear, Int8Linear)) for m in a.model.modules())
        assert all(m.qscale.dtype == torch.float16 for m in layers)  # not cast to the compute dtype
        x = torch.tensor([PROMPTS[0]])
        la, lb = a.model(x).float(), b.model(x).float()
        assert not torch.equal(la, lb)
        # Close to float: 4-bit weights (a step of 1/7.5 of each group's largest weight, ~9%
        # rms error per weight on these random Gaussian layers) in every attention and
        # shared-expert layer, and routers that then pick other experts, move these tiny
        # random models' logits a lot: measured mean |error| 23% (qwen2_moe) and 37%
        # (mixtral) of the mean |logit| (int8: 2%). 0.6 bounds that; unrelated logits are ~140%.
        assert float((la - lb).abs().mean() / la.abs().mean()) < 0.6
        # Exact: the float model given the dequantized int4 weights computes the same
        # logits (int16 activations: the int8 ones flip near-tied routes of random models,
        # linear.py); measured 1e-4 of the range, so a wrong code, scale or pad fails.
        mods = dict(a.model.named_modules())
        for name, m in b.model.named_modules():
            if isinstance(m, Int4Linear):
                mods[name].weight.data = m.dequantized().to(mods[name].weight.dtype)
        prev = K.set_activations("int16")
        try:
            lr, l16 = a.model(x).float(), b.model(x).float()
        finally:
            K.set_activations(prev)
        assert float((lr - l16).abs().max() / lr.abs().max()) < 2e-3
        # the budget counts the fp16 scales as stored: the bytes the layers hold
        held = sum(t.nbytes for t in b.model.state_dict().values())
        assert b.info["resident_bytes"] == held
        assert b.info["resident_bytes"] < a.info["resident_bytes"]
        want = run_prompts(b)
    finally:
        a.close()
        b.close()
    # Offloaded with the smallest cache: the same tokens as everything in RAM.
    assert offloaded_prompts(q4) == want


def _edit_manifest(src, dst, edit):
    """A copy of the converted model `src` at `dst` with its manifest edited (and re-signed)."""
    shutil.copytree(src, dst)
    return edit_manifest(dst, edit)


def test_bad_int4_layer_names_are_refused(stores, tmp_path):
    q4 = stores[4]
    path = _edit_manifest(q4, tmp_path / "bad", lambda d: d["resident"]["int4"].append("layers.0.attn.nope"))
    with pytest.raises(StoreError, match=re.escape(str(path)) + ".*int4 resident layer 'layers.0.attn.nope'"):
        edgemoe.load(tmp_path / "bad")
    # a layer listed as both int8 and int4
    both = _edit_manifest(q4, tmp_path / "both", lambda d: d["resident"].__setitem__("int8", d["resident"]["int4"][:1]))
    with pytest.raises(StoreError, match=re.escape(str(both)) + ".*both int8 and int4"):
        read_manifest(tmp_path / "both")
    # an older reader (version 5) refuses it by version; here: a newer version than ours
    newer = _edit_manifest(q4, tmp_path / "newer", lambda d: d.__setitem__("version", 7))
    with pytest.raises(StoreError, match=re.escape(str(newer)) + ".*version 7 is newer"):
        read_manifest(tmp_path / "newer")


def test_resident_flag_choices():
    assert convert_parser().parse_args(["a", "b", "--resident", "int4"]).resident == "int4"
    assert bench_parser().parse_args(["--resident", "int4"]).resident == "int4"
    for parser, argv in ((convert_parser(), ["a", "b"]), (bench_parser(), [])):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--resident", "int2"])


def test_gguf_input_converts_with_int4_resident(tmp_path, tokenizer_dir):
    from conftest import save_checkpoint, tiny_config

    from store.gguf_helpers import write_gguf

    hf = save_checkpoint(tiny_config("qwen3_moe", hidden_size=64, moe_intermediate_size=64), tmp_path / "hf",
                         tokenizer_dir, dtype=torch.float16).float()
    (gguf,), _ = write_gguf(hf, tokenizer_dir, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    out = make_converted(gguf, tmp_path / "q4", resident="int4")
    m = read_manifest(out)
    assert m.version == 6 and "layers.0.attn.q" in m.resident_int4 and m.config["gguf"]["file"] == gguf.name
    engine = edgemoe.load(out, mode="io-free")
    try:
        assert any(isinstance(x, Int4Linear) for x in engine.model.modules())
        assert len(run_prompts(engine, PROMPTS[:1], 2)[0]) == 2
    finally:
        engine.close()


def test_info_reports_the_int4_layers(stores):
    from edgemoe.cli.info import format_info, model_info

    q4 = stores[4]
    info = model_info(q4)
    n = len(read_manifest(q4).resident_int4)
    assert info["resident_int4_layers"] == n and info["resident_int8_layers"] == 0
    engine = edgemoe.load(q4, mode="io-free")
    try:
        assert info["resident_bytes"] == engine.info["resident_bytes"]  # the budget counts what loading holds
    finally:
        engine.close()
    assert f"({n} linear layers int4)" in format_info(info)
