"""Expert biases and MXFP4 experts in the expert store: biases travel in every format's
blob (manifest version 3 says so), stores without them load as before, MXFP4 checkpoints
are stored code for code (or dequantized exactly into another format), and `--format
mxfp4` quantizes float experts per the OCP MX spec."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import edgemoe
from edgemoe.checkpoint import load_hf
from edgemoe.errors import StoreError
from edgemoe.quant import mxfp4
from edgemoe.store.reader import ExpertStore

from models.families.test_gpt_oss import CONFIGS
from store.helpers import PROMPTS, make_checkpoint, make_converted, manifest, min_budget, reference, run_prompts
from store.mxfp4_helpers import randomize_gpt_oss, write_mxfp4_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """A float gpt-oss checkpoint with non-zero expert biases and its MXFP4 version."""
    root = tmp_path_factory.mktemp("gpt_oss-store")
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt_oss-sliding-yarn"]()).eval()
    randomize_gpt_oss(hf, seed=5)
    hf.save_pretrained(root / "float")
    for f in tokenizer_dir.iterdir():
        (root / "float" / f.name).write_bytes(f.read_bytes())
    write_mxfp4_checkpoint(hf, root / "float", root / "mxfp4")
    return root / "float", root / "mxfp4"


def stored_parts(conv, key=(1, 2)) -> dict[str, torch.Tensor]:
    """The tensors of one expert's blob, read and checked as the runtime does."""
    store = ExpertStore(conv, direct_io=False)
    try:
        entry = store.entries[key]
        buf = torch.empty(entry.length, dtype=torch.uint8)
        store.read_into(entry, memoryview(buf.numpy()))
        store.verify(entry, memoryview(buf.numpy()))
        expert = store.expert(entry, buf, "swiglu_clamped", torch.float32)
        parts = {n: buf[a:b].view(dt).view(shape).clone() for n, a, b, dt, shape in store._parts[entry.format]}
    finally:
        store.close()
    return parts, expert


def fused(src, name: str) -> torch.Tensor:
    return load_file(src / "model.safetensors")[name]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "mxfp4"])
def test_biases_are_stored_in_every_format(checkpoints, tmp_path, fmt):
    src, _ = checkpoints
    conv = make_converted(src, tmp_path / fmt, fmt=fmt)
    m = manifest(conv)
    assert m["version"] == 3 and m["expert_biases"] == {"dtype": "float32", "parts": ["b13", "b2"]}
    # Float formats keep the biases in their own type (their matmuls' output type).
    want = torch.bfloat16 if fmt == "bf16" else torch.float32
    assert [(p["name"], p["dtype"]) for p in m["formats"][fmt]["parts"]][-2:] == [
        ("b13", str(want)[6:]), ("b2", str(want)[6:])]
    parts, expert = stored_parts(conv)
    bias = fused(src, "model.layers.1.mlp.experts.gate_up_proj_bias")[2]  # gate, up alternating
    assert torch.equal(parts["b13"], torch.cat([bias[0::2], bias[1::2]]).to(want))
    assert torch.equal(parts["b2"], fused(src, "model.layers.1.mlp.experts.down_proj_bias")[2].to(want))
    assert torch.equal(expert.b13, parts["b13"]) and torch.equal(expert.b2, parts["b2"])
    engine = edgemoe.load(conv, memory=None)
    try:
        assert len(run_prompts(engine, PROMPTS[:1], 2)[0]) == 2
    finally:
        engine.close()


def test_float_format_mxfp4_quantizes_per_spec(checkpoints, tmp_path):
    src, _ = checkpoints
    parts, _ = stored_parts(make_converted(src, tmp_path / "q", fmt="mxfp4"))
    w = fused(src, "model.layers.1.mlp.experts.gate_up_proj")[2]  # (H, 2I), alternating columns
    blocks, scales = mxfp4.quantize(torch.cat([w[:, 0::2].T, w[:, 1::2].T]))
    assert torch.equal(parts["w13.blocks"], blocks) and torch.equal(parts["w13.scales"], scales)
    blocks, scales = mxfp4.quantize(fused(src, "model.layers.1.mlp.experts.down_proj")[2].T)
    assert torch.equal(parts["w2.blocks"], blocks) and torch.equal(parts["w2.scales"], scales)


def test_mxfp4_checkpoint_is_stored_code_for_code(checkpoints, tmp_path):
    """Without --format the released codes are kept: the blob holds exactly the
    checkpoint's blocks and scales (gate rows, then up rows), and the offloaded runtime
    gives the in-RAM engine's tokens at the smallest budget."""
    _, src = checkpoints
    conv = make_converted(src, tmp_path / "conv")
    m = manifest(conv)
    assert set(m["formats"]) == {"mxfp4"} and m["formats"]["mxfp4"]["bits"] == 4.25 and m["version"] == 3
    parts, _ = stored_parts(conv)
    blocks = fused(src, "model.layers.1.mlp.experts.gate_up_proj_blocks")[2]  # (2I, G, 16)
    scales = fused(src, "model.layers.1.mlp.experts.gate_up_proj_scales")[2]
    assert torch.equal(parts["w13.blocks"], torch.cat([blocks[0::2], blocks[1::2]]).flatten(1))
    assert torch.equal(parts["w13.scales"], torch.cat([scales[0::2], scales[1::2]]))
    assert torch.equal(parts["w2.blocks"], fused(src, "model.layers.1.mlp.experts.down_proj_blocks")[2].flatten(1))
    assert torch.equal(parts["w2.scales"], fused(src, "model.layers.1.mlp.experts.down_proj_scales")[2])
    ref = reference(src)
    for memory in (min_budget(conv), None):
        engine = edgemoe.load(conv, memory=memory, prefetch=memory is not None)
        try:
            assert run_prompts(engine) == ref, memory
        finally:
            engine.close()


def test_mxfp4_checkpoint_to_float_format_dequantizes_exactly(checkpoints, tmp_path):
    _, src = checkpoints
    conv = make_converted(src, tmp_path / "fp32", fmt="fp32")
    parts, _ = stored_parts(conv)
    model, _ = load_hf(src)
    expert = model.layers[1].mlp.provider.table[(1, 2)]
    assert torch.equal(parts["w13"], mxfp4.dequantize(expert.w13.blocks, expert.w13.scales, expert.w13.k))
    assert torch.equal(parts["w2"], mxfp4.dequantize(expert.w2.blocks, expert.w2.scales, expert.w2.k))
    engine = edgemoe.load(conv, memory=None)
    try:
        assert run_prompts(engine) == reference(src)
    finally:
        engine.close()


def test_store_without_biases_loads_as_before(tmp_path, tokenizer_dir):
    """A model without expert biases writes the version-1 manifest, with no bias parts."""
    src = make_checkpoint(tmp_path / "mixtral", tokenizer_dir=tokenizer_dir)
    m = manifest(make_converted(src, tmp_path / "conv"))
    assert m["version"] == 1 and "expert_biases" not in m
    assert [p["name"] for p in m["formats"]["fp32"]["parts"]] == ["w13", "w2"]
    engine = edgemoe.load(tmp_path / "conv", memory=None)
    engine.close()


def rewrite(conv, edit) -> None:
    """Edit the manifest and re-sign it (as a writer that knows the fields would)."""
    path = conv / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    body = {k: v for k, v in d.items() if k != "checksum"}
    d["checksum"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    path.write_text(json.dumps(d))


def test_manifest_bias_errors(checkpoints, tmp_path):
    src, _ = checkpoints
    conv = make_converted(src, tmp_path / "conv", fmt="int8")
    # Read as version 2, the biases are not known: the blob layout no longer matches.
    rewrite(conv, lambda d: d.__setitem__("version", 2))
    with pytest.raises(StoreError, match="format int8: the blob layout in the manifest does not match"):
        edgemoe.load(conv, memory=None)
    rewrite(conv, lambda d: d.update(version=3, expert_biases={"dtype": "float32", "parts": ["b2", "b13"]}))
    with pytest.raises(StoreError, match=r"expert_biases.parts \['b2', 'b13'\] must be a non-empty ordered subset"):
        edgemoe.load(conv, memory=None)
    rewrite(conv, lambda d: d.update(expert_biases={"dtype": "int8", "parts": ["b13", "b2"]}))
    with pytest.raises(StoreError, match="expert_biases.dtype must name a float type, got 'int8'"):
        edgemoe.load(conv, memory=None)
    rewrite(conv, lambda d: d.update(version=99))
    with pytest.raises(StoreError, match="manifest version 99 is newer"):
        edgemoe.load(conv, memory=None)


def test_mxfp4_checkpoint_errors(checkpoints, tmp_path):
    """Codes without the quantization_config that declares them, experts in both kinds, and
    a missing exponent tensor are each refused, naming what is wrong."""
    import shutil

    from safetensors.torch import save_file

    from edgemoe.errors import ModelLoadError

    _, src = checkpoints
    tensors = load_file(src / "model.safetensors")

    def variant(name, edit_tensors=None, edit_config=None):
        out = tmp_path / name
        shutil.copytree(src, out)
        t = dict(tensors)
        if edit_tensors:
            edit_tensors(t)
        save_file(t, out / "model.safetensors", metadata={"format": "pt"})
        if edit_config:
            cfg = json.loads((out / "config.json").read_text())
            edit_config(cfg)
            (out / "config.json").write_text(json.dumps(cfg))
        return out

    bad = variant("noquant", edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(ModelLoadError, match="down_proj_blocks' looks like MXFP4 data, but config.json has no quantization_config"):
        load_hf(bad)
    mixed = variant("mixed", lambda t: t.update({"model.layers.0.mlp.experts.down_proj": torch.zeros(4, 32, 64)}))
    with pytest.raises(ModelLoadError, match="both as float weights and as MXFP4 blocks and scales"):
        load_hf(mixed)
    missing = variant("missing", lambda t: t.pop("model.layers.2.mlp.experts.down_proj_scales"))
    with pytest.raises(ModelLoadError, match="layer 2 expert 0 is missing down_scales weights"):
        load_hf(missing)
    with pytest.raises(ModelLoadError, match="layer 2 expert 0 is missing down_scales weights"):
        make_converted(missing, tmp_path / "conv")
