"""Routers that choose experts in fp32 in transformers (`_keep_in_fp32_modules_strict`:
gate weight and correction bias) keep those tensors in fp32 in a bf16 model, loaded from
the Hugging Face directory or from a converted one, and the budget counts them so."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import edgemoe
from edgemoe.checkpoint import load_hf

from models import parity
from models.families.test_deepseek_v3 import CONFIGS as V3
from models.families.test_glm4_moe import CONFIGS as GLM
from store.helpers import make_converted


@pytest.mark.parametrize("factory", [next(iter(V3.values())), next(iter(GLM.values()))])
def test_router_tensors_stay_fp32_in_bf16(tmp_path, tokenizer_dir, factory):
    hf = parity.save(factory(), tmp_path / "hf", tokenizer_dir)  # fp32 on disk, as transformers keeps these
    model, _ = load_hf(tmp_path / "hf", "bfloat16")
    names = model.fp32_names()
    assert names and all(n.endswith(("router.weight", "router.e_score_correction_bias")) for n in names)
    params = dict(model.named_parameters())
    assert {params[n].dtype for n in names} == {torch.float32}
    assert params["embed.weight"].dtype == torch.bfloat16
    # The values are the checkpoint's fp32 ones, not rounded through bf16 (transformers'
    # from_pretrained(dtype=bfloat16) keeps them so too).
    want = hf.model.layers[hf.config.first_k_dense_replace].mlp.gate.e_score_correction_bias
    layer = hf.config.first_k_dense_replace
    got = params[f"layers.{layer}.mlp.router.e_score_correction_bias"]
    assert want.dtype == torch.float32 and torch.equal(got, want)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_slice(f"model.layers.{layer}.mlp.gate.weight").get_dtype() == "F32"
    # Converted: the same tensors, the same logits.
    conv = make_converted(tmp_path / "hf", tmp_path / "conv", dtype="bfloat16")
    engine = edgemoe.load(conv)
    try:
        conv_params = dict(engine.model.named_parameters())
        assert {conv_params[n].dtype for n in names} == {torch.float32}
        assert torch.equal(conv_params[f"layers.{layer}.mlp.router.e_score_correction_bias"], got)
        ids = parity.prompt_ids(model.args.vocab_size)
        with torch.no_grad():
            assert torch.equal(engine.model(ids), model(ids))
    finally:
        engine.close()
