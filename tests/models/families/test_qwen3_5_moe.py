"""Qwen3.5-MoE (text): tiny configs for the shared parity checks, and its own tests (the
multimodal checkpoint layout with a vision tower, in RAM and offloaded; routing and
structure against transformers; the text rope against transformers' mrope; refusals).
The Gated DeltaNet and its state cache are tested with Qwen3-Next (test_qwen3_next.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf

import edgemoe
from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import qwen3_5_moe
from edgemoe.models.moe import MoEBlock
from edgemoe.models.recurrent import GatedDeltaNet

from models import parity
from models.parity import check_routing
from models.families.test_qwen3_next import make_pair, perturb
from store.helpers import PROMPTS, make_converted, min_budget, run_prompts

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

TEXT = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512,
            hidden_size=64, num_attention_heads=4, linear_conv_kernel_dim=4)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              temporal_patch_size=1, spatial_merge_size=1)

# GQA 2, head_dim 16 (a quarter rotated), 2 value heads per key head, 4 experts top-2 with
# a shared expert, full attention every 4th layer, untied.
MULTIMODAL_TEXT = dict(
    TEXT, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=24,
)

CONFIGS = {
    # As MULTIMODAL_TEXT (which test_multimodal_checkpoint also runs with a vision tower).
    "qwen3_5_moe-text-untied": lambda: tf.Qwen3_5MoeTextConfig(**MULTIMODAL_TEXT, tie_word_embeddings=False),
    # Explicit layer types with two full-attention layers, one value head per key head
    # (dk 12, dv 8), GQA 4, head_dim 24 half rotated, multimodal rope sections (text
    # positions: plain RoPE), 6 experts top-3, conv kernel 2, tied embeddings.
    "qwen3_5_moe-mrope-tied": lambda: tf.Qwen3_5MoeTextConfig(
        **dict(TEXT, linear_conv_kernel_dim=2), num_hidden_layers=4, num_key_value_heads=1, head_dim=24,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=12, linear_value_head_dim=8,
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, shared_expert_intermediate_size=16,
        tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 2, 2], "mrope_interleaved": True},
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (*make_pair(CONFIGS[request.param], out), out)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory, tokenizer_dir):
    """A Qwen3_5MoeForConditionalGeneration checkpoint: text_config, the language model
    under model.language_model., a vision tower under model.visual."""
    out = tmp_path_factory.mktemp("qwen3_5_moe-multimodal")
    torch.manual_seed(0)
    config = tf.Qwen3_5MoeConfig(text_config=dict(MULTIMODAL_TEXT, initializer_range=0.1), vision_config=VISION,
                                 tie_word_embeddings=False)
    hf = tf.Qwen3_5MoeForConditionalGeneration(config).eval()
    perturb(hf)
    hf.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return hf, out


@torch.no_grad()
def test_multimodal_checkpoint(multimodal, tmp_path):
    """The text model of a multimodal checkpoint loads (vision tensors skipped), gives
    transformers' text-only logits and greedy tokens, and runs offloaded under the
    smallest budget with the in-RAM engine's tokens."""
    hf, out = multimodal
    keys = json.loads((out / "config.json").read_text())
    assert keys["model_type"] == "qwen3_5_moe" and "text_config" in keys
    model, ckpt = load_hf(out)
    assert any(r.name.startswith("model.visual.") for r in ckpt.refs)
    assert isinstance(model.args, qwen3_5_moe.ModelArgs) and model.args.num_experts == 4
    parity.check_logits(hf, model)
    prompt = parity.prompt_ids(model.args.vocab_size, n=6, seed=5)
    want = hf.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, eos_token_id=None)[0, 6:]
    from edgemoe.generate import generate_step
    assert list(generate_step(model, prompt[0].tolist(), max_tokens=12)) == want.tolist()
    ref_engine = edgemoe.load(out)
    try:
        ref = run_prompts(ref_engine)
    finally:
        ref_engine.close()
    conv = make_converted(out, tmp_path / "conv")
    engine = edgemoe.load(conv, memory=min_budget(conv), prefetch=True)
    try:
        assert run_prompts(engine, PROMPTS) == ref
    finally:
        engine.close()


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers])
    parity.check_logits(hf, model)  # with perturbed norms, dt_bias and A_log


def test_structure_matches_transformers(pair):
    """Every layer MoE with a gated shared expert and renormalised top-k; separate
    DeltaNet projections; the rotated channels' frequencies are transformers'."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        assert isinstance(ours.mlp, MoEBlock) and ours.mlp.router.norm_topk and ours.mlp.shared_gate is not None
        assert ours.mlp.shared.gate.out_features == cfg.shared_expert_intermediate_size
        linear = cfg.layer_types[i] == "linear_attention"
        assert isinstance(ours.attn, GatedDeltaNet) == linear == hasattr(theirs, "linear_attn")
        if linear:
            assert not ours.attn.grouped and ours.attn.kernel == cfg.linear_conv_kernel_dim
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
    first = cfg.layer_types.index("full_attention")
    torch.testing.assert_close(model.layers[first].attn.rope.inv_freq, hf.model.rotary_emb.inv_freq,
                               atol=0, rtol=1e-6)


def test_sanitize_multimodal_names():
    w = torch.zeros(2, 2)
    assert qwen3_5_moe.sanitize("model.visual.blocks.0.attn.qkv.weight", w) == []
    assert qwen3_5_moe.sanitize("mtp.fc.weight", w) == []
    assert qwen3_5_moe.sanitize("model.language_model.layers.2.linear_attn.in_proj_z.weight", w)[0][0] == (
        "layers.2.attn.in_z.weight")
    assert qwen3_5_moe.sanitize("model.language_model.embed_tokens.weight", w)[0][0] == "embed.weight"
    fused = dict(qwen3_5_moe.sanitize("model.language_model.layers.1.mlp.experts.gate_up_proj",
                                      torch.arange(2 * 4 * 3.0).view(2, 4, 3)))
    assert sorted(fused) == ["experts.1.0.gate", "experts.1.0.up", "experts.1.1.gate", "experts.1.1.up"]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: text_config must be an object"):
        qwen3_5_moe.ModelArgs.from_dict({"model_type": "qwen3_5_moe", "text_config": None})
    with pytest.raises(ModelLoadError, match="config.json: text_config: attention_bias true is not supported"):
        qwen3_5_moe.ModelArgs.from_dict({"model_type": "qwen3_5_moe", "text_config": dict(config, attention_bias=True)})
    with pytest.raises(ModelLoadError, match="config.json: num_experts must be positive"):
        qwen3_5_moe.ModelArgs.from_dict(dict(config, num_experts=0))
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        qwen3_5_moe.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
