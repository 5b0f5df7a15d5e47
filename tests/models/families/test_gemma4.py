"""Gemma 4 text MoE: tiny configs for the shared parity checks (one multimodal checkpoint
with a vision tower, one text-only), and its own tests (the router by hand, routing,
structure and the learned scales against transformers, sanitize, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import gemma4
from edgemoe.models.gemma4_blocks import Gemma4MoE, Gemma4Router, ProportionalRoPE

from models import parity

TEXT = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=512,
            hidden_size_per_layer_input=0, enable_moe_block=True, hidden_size=64, num_attention_heads=4)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, position_embedding_size=64)

CONFIGS = {
    # Multimodal layout (vision tower to drop, tied head): sliding layers with head_dim 16
    # and GQA 2, window 8; a global layer with head_dim 32, one kv head and keys = values
    # (attention_k_eq_v), proportional rope over a quarter; soft-capped logits; 4 experts top-2.
    "gemma4-multimodal-keqv": lambda: tf.Gemma4Config(
        text_config=dict(
            TEXT, intermediate_size=48, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_experts=4,
            top_k_experts=2, moe_intermediate_size=24,
        ),
        vision_config=VISION, audio_config=None,
    ),
    # Text-only config, untied head, attention biases, no soft-capping, MHA sliding
    # layers (window 6) alternating with global ones of head_dim 24 (k and v separate),
    # proportional rope over half with a factor, 6 experts top-3.
    "gemma4-text-bias-untied": lambda: tf.Gemma4TextConfig(
        **TEXT, intermediate_size=40, num_hidden_layers=4, num_key_value_heads=4, head_dim=16, global_head_dim=24,
        attention_bias=True, sliding_window=6, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0,
                               "rope_theta": 100000.0},
        },
        num_experts=6, top_k_experts=3, moe_intermediate_size=20,
    ),
}


def text_model(hf):
    return hf.model.language_model if hasattr(hf.model, "language_model") else hf.model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


def test_router_by_hand():
    """x = (3, 4): rms(x) / sqrt(2) = (0.6, 0.8); scale (2, 1) makes it (1.2, 0.8), so the
    logits are (1.2, 0.8, -1.2). The top two renormalise to softmax(1.2, 0.8) and are
    then multiplied by their per-expert scales 0.5 and 3."""
    r = Gemma4Router(2, 3, 2, eps=0.0)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        r.scale.copy_(torch.tensor([2.0, 1.0]))
        r.per_expert_scale.copy_(torch.tensor([0.5, 3.0, 1.0]))
    weights, ids, logits = r(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(logits, torch.tensor([[1.2, 0.8, -1.2]]), atol=1e-6, rtol=0)
    assert ids.tolist() == [[0, 1]]
    p0 = 1 / (1 + math.exp(-0.4))
    torch.testing.assert_close(weights, torch.tensor([[0.5 * p0, 3 * (1 - p0)]]), atol=1e-6, rtol=0)


def test_proportional_rope_frequencies_by_hand():
    """head_dim 8, a quarter rotated, theta 100, factor 2: one frequency 1/2, three zeros."""
    rope = ProportionalRoPE(8, 100.0, 0.25, factor=2.0)
    assert rope.inv_freq.tolist() == [0.5, 0.0, 0.0, 0.0]
    rope = ProportionalRoPE(8, 100.0, 0.5)
    torch.testing.assert_close(rope.inv_freq, torch.tensor([1.0, 100 ** -0.25, 0.0, 0.0]))


def test_routing_matches_transformers(pair):
    """Per MoE layer: transformers' router returns (softmax probabilities, weights, ids)."""
    hf, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size, seed=2)
    ours = parity.routed_layers(model, ids)
    layers = text_model(hf).layers
    theirs = [None] * len(layers)
    hooks = [layer.router.register_forward_hook(lambda m, a, o, i=i: theirs.__setitem__(i, o))
             for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(ours) == list(range(len(layers)))
    for layer, (probs, want_w, want_ids) in enumerate(theirs):
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(torch.softmax(got_logits.float(), -1), probs, atol=1e-6, rtol=0)
        got_ids, order = got_ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-6, rtol=0)


def test_structure_matches_transformers(pair):
    """Every layer has a dense MLP and the experts; per layer the window, head shape,
    whether values have their own projection and the rope kind equal transformers'."""
    hf, model, _ = pair
    cfg = text_model(hf).config
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    for ours, theirs in zip(model.layers, text_model(hf).layers, strict=True):
        att = theirs.self_attn
        assert isinstance(ours.mlp, Gemma4MoE) and theirs.enable_moe_block
        assert ours.dense.up.weight.shape == theirs.mlp.up_proj.weight.shape
        assert ours.attn.spec.sliding_window == att.sliding_window
        kv_heads = att.k_proj.out_features // att.head_dim
        assert (ours.attn.spec.head_dim, ours.attn.spec.kv_heads) == (att.head_dim, kv_heads)
        assert hasattr(ours.attn, "v") == (att.v_proj is not None)
        assert isinstance(ours.attn.rope, ProportionalRoPE) == (att.layer_type == "full_attention")
        assert (ours.attn.q.bias is not None) == cfg.attention_bias
    assert model.logits_softcap == cfg.final_logit_softcapping
    assert model.embed_scale == cfg.hidden_size**0.5
    assert hasattr(model, "lm_head") == (hf.lm_head.weight is not text_model(hf).embed_tokens.weight)


@torch.no_grad()
def test_learned_scales_match_transformers(pair, tmp_path):
    """Random weights leave every norm weight, router scale, per-expert scale and layer
    scalar at 1; set them all to random values and compare the logits again."""
    hf, _, _ = pair
    g = torch.Generator().manual_seed(7)
    for name, p in text_model(hf).named_parameters():
        if p.dim() == 1 and not name.endswith("bias"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    for layer in text_model(hf).layers:
        layer.layer_scalar.fill_(0.5 + torch.rand(1, generator=g).item())
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    parity.check_logits(hf, model)


def test_sanitize_drops_towers_and_splits_experts():
    t = torch.zeros(2)
    for name in ("model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight",
                 "model.embed_vision.embedding_projection.weight", "model.audio_tower.layers.0.x",
                 "model.embed_audio.embedding_projection.weight"):
        assert gemma4.sanitize(name, t) == []
    for prefix in ("model.language_model.", "model."):
        assert gemma4.sanitize(prefix + "layers.3.router.per_expert_scale", t) == [
            ("layers.3.mlp.router.per_expert_scale", t)]
        assert gemma4.sanitize(prefix + "layers.3.pre_feedforward_layernorm_2.weight", t)[0][0] == (
            "layers.3.mlp.norm.weight")
        fused = torch.randn(3, 8, 5)  # (E, 2I, H)
        out = dict(gemma4.sanitize(prefix + "layers.1.experts.gate_up_proj", fused))
        assert torch.equal(out["experts.1.2.gate"], fused[2, :4]) and torch.equal(out["experts.1.2.up"], fused[2, 4:])
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        gemma4.sanitize("model.language_model.embed_tokens_per_layer.weight", t)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input 256 .per-layer embeddings. is not supported"),
    ({"num_kv_shared_layers": 1}, "num_kv_shared_layers 1 .KV sharing between layers. is not supported"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention 'all' is not supported"),
    ({"enable_moe_block": False}, "enable_moe_block is false"),
    ({"per_layer_config": {"2": {"head_dim": 32, "sliding_window": 4}}}, "per_layer_config.2 overrides sliding_window"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "factor": 2.0},
                          "full_attention": {"rope_type": "default"}}},
     "rope_parameters.sliding_attention.rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "rope_parameters must map each layer type"),
])
def test_unsupported_options_refused(pair, change, message):
    hf, _, out = pair
    config = json.loads((out / "config.json").read_text())
    nested = "text_config" in config
    text = {**(config["text_config"] if nested else config), **change}
    bad = {**config, "text_config": text} if nested else text
    where = "config.json: text_config: " if nested else "config.json: "
    with pytest.raises(ModelLoadError, match=where + message):
        gemma4.ModelArgs.from_dict(bad)


def test_multimodal_config_reads_text_part_and_top_level_tie():
    text = dict(TEXT, model_type="gemma4_text", num_hidden_layers=2, num_experts=4, top_k_experts=2,
                moe_intermediate_size=8, tie_word_embeddings=True)
    args = gemma4.ModelArgs.from_dict({"model_type": "gemma4", "text_config": text, "tie_word_embeddings": False})
    assert args.model_type == "gemma4" and not args.tie_word_embeddings
    assert args.layer_types == ["sliding_attention", "full_attention"]  # the last layer is always global
    assert args.shapes == [(256, 4), (512, 4)]  # defaults: 4 kv heads, head_dim 256, global_head_dim 512
    with pytest.raises(ModelLoadError, match="config.json: text_config must be an object"):
        gemma4.ModelArgs.from_dict({"model_type": "gemma4"})
