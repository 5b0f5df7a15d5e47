"""Phi-3.5-MoE (phimoe): tiny configs for the shared parity checks, and its own tests
(SparseMixer routing by hand, routing and structure against transformers with random
biases and LayerNorms, LongRoPE on both sides of original_max_position_embeddings and
across it with the KV cache, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import phimoe
from edgemoe.models.norms import LayerNorm
from edgemoe.models.rope import LongRoPE

from models import parity
from models.families.test_ernie4_5_moe import identity_router, perturb
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)
HALF = 8  # head_dim 16 / 2: entries of each longrope factor list


def longrope(original_max: int) -> dict:
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
            "long_factor": [2.0 + 0.5 * i for i in range(HALF)], "short_mscale": 1.1, "long_mscale": 1.3,
            "original_max_position_embeddings": original_max}


CONFIGS = {
    # Bias on q/k/v/o and the LM head, a sliding window shorter than the parity sequence,
    # LongRoPE whose original context (64) every parity run stays within (short mscale).
    "phimoe-bias-window-longrope-short": lambda: tf.PhimoeConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, attention_bias=True, lm_head_bias=True, sliding_window=8,
        tie_word_embeddings=False, rope_parameters=longrope(64),
    ),
    # 6 experts with a wide SparseMixer threshold (jitter 0.1), GQA 4, no biases, and an
    # original context of 4 that every parity forward reaches past (long mscale).
    "phimoe-gqa4-jitter-longrope-long": lambda: tf.PhimoeConfig(
        **BASE, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, num_local_experts=6, router_jitter_noise=0.1, tie_word_embeddings=False,
        rope_parameters=longrope(4),
    ),
}

TINY = dict(model_type="phimoe", vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, num_local_experts=4, router_jitter_noise=0.01)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def test_sparsemixer_by_hand():
    """jitter 0.01: a logit z_j stays in a softmax next to the pick m while
    (m - z_j) / max(|z_j|, m) <= 0.02.

    (2, 1, 1.98, -1): first expert 0; 1.98 is within 0.01 of 2, so its weight is
    softmax(2, 1.98) at 2 = 1 / (1 + e^-0.02). Second expert 2 (1.98): expert 1 is 0.495
    away, so alone: weight 1.
    (3, 2, 1.99, 0): expert 0 alone (the others are >= 1/3 away): weight 1. Second
    expert 1 (2), with 1.99 at 0.005: weight 1 / (1 + e^-0.01).
    (-1, -1.01, -3, -1.5), all negative so the divisor is |z_j|: first expert 0 with
    -1.01 at 0.0099: 1 / (1 + e^-0.01); second expert 1, alone: weight 1."""
    args = phimoe.ModelArgs.from_dict(TINY)
    r = identity_router(phimoe, args)
    x = torch.tensor([[2.0, 1.0, 1.98, -1.0], [3.0, 2.0, 1.99, 0.0], [-1.0, -1.01, -3.0, -1.5]])
    weights, ids, logits = r(x)
    torch.testing.assert_close(logits, x)
    assert ids.tolist() == [[0, 2], [0, 1], [0, 1]]
    a, b = 1 / (1 + math.exp(-0.02)), 1 / (1 + math.exp(-0.01))
    torch.testing.assert_close(weights, torch.tensor([[a, 1.0], [1.0, b], [b, 1.0]]), atol=1e-6, rtol=0)
    # Look-ahead ranks by the raw logits: its two best are the two picks, in order.
    assert r.lookahead_logits(x).topk(2).indices.tolist() == ids.tolist()
    assert not r.supports_adaptive


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.router for layer in hf.model.layers])
    parity.check_logits(hf, model)  # with random attention/LM-head biases and LayerNorms


def test_structure_matches_transformers(pair):
    """Every layer MoE with SparseMixer's two experts, LayerNorms with bias, biases and
    the window as configured, LongRoPE switching at the configured original context."""
    hf, model, _ = pair
    cfg = hf.config
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert ours.mlp.router.kind == "sparsemixer" and ours.mlp.num_experts == theirs.mlp.router.num_experts
        assert ours.mlp.router.jitter_eps == theirs.mlp.router.router_jitter_noise
        assert isinstance(ours.norm1, LayerNorm) and isinstance(ours.norm2, LayerNorm)
        assert ours.norm1.eps == theirs.input_layernorm.eps
        assert (ours.attn.q.bias is not None) == (ours.attn.o.bias is not None) == cfg.attention_bias
        assert ours.attn.spec.sliding_window == cfg.sliding_window
        assert isinstance(ours.attn.rope, LongRoPE)
        assert ours.attn.rope.original_max == cfg.rope_parameters["original_max_position_embeddings"]
    assert isinstance(model.norm, LayerNorm)
    assert (model.lm_head.bias is not None) == cfg.lm_head_bias


@torch.no_grad()
def test_longrope_both_sides_and_across_the_cache(tmp_path):
    """original_max_position_embeddings 8: a forward over 6 tokens uses the short mscale,
    one over 12 the long one for every position (both equal transformers').

    Decoding one token at a time from a 4-token prefill crosses 8 with the KV cache: the
    keys cached before keep the short scale, so each step equals transformers' forward
    with its cache step by step, and differs from a full forward over the same tokens
    from position 8 on. (transformers' `generate` instead drops its cache at the first
    step past 8 and recomputes the whole sequence, which edgemoe's generation does not:
    see edgemoe.models.rope.LongRoPE.)"""
    from transformers import DynamicCache

    hf = parity.save(tf.PhimoeConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, tie_word_embeddings=False, rope_parameters=longrope(8),
    ), tmp_path)
    model, _ = load_hf(tmp_path)
    ids = parity.prompt_ids(model.args.vocab_size, n=12, seed=4)
    for n in (6, 12):
        torch.testing.assert_close(model(ids[:, :n]), hf(ids[:, :n]).logits, atol=parity.ATOL, rtol=0)

    cache, hf_cache = model.make_cache(), DynamicCache(config=hf.config)
    ours = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache) for t in range(4, 12)]
    theirs = [hf(ids[:, :4], cache=hf_cache, use_cache=True).logits]
    theirs += [hf(ids[:, t : t + 1], cache=hf_cache, use_cache=True).logits for t in range(4, 12)]
    cached = torch.cat(ours, dim=1)  # (1, 12, V)
    torch.testing.assert_close(cached, torch.cat(theirs, dim=1), atol=parity.ATOL, rtol=0)
    full = model(ids)  # (1, 12, V), long scale everywhere
    # Up to position 7 every call stayed within 8 (a forward over exactly 8 is still short).
    torch.testing.assert_close(cached[:, :8], model(ids[:, :8]), atol=parity.ATOL, rtol=0)
    assert (cached[:, 8:] - full[:, 8:]).abs().max() > 1e-2  # positions >= 8 attend to short-scale keys


def test_original_max_from_top_level():
    """A top-level original_max_position_embeddings wins over the rope block's, as in
    transformers (Phi-3.5-MoE's config.json carries both)."""
    args = phimoe.ModelArgs.from_dict(dict(TINY, head_dim=16, original_max_position_embeddings=32,
                                           rope_scaling=dict(longrope(8), type="longrope")))
    assert args.rope_scaling["original_max_position_embeddings"] == 32
    assert args.rope_theta == 10000.0
    assert phimoe.ModelArgs.from_dict(TINY).rope_theta == 1e6  # PhimoeConfig.default_theta


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    with pytest.raises(ModelLoadError, match="config.json: num_experts_per_tok 3 is not supported"):
        phimoe.ModelArgs.from_dict(dict(config, num_experts_per_tok=3))
    with pytest.raises(ModelLoadError, match="config.json: lm_head_bias with tie_word_embeddings"):
        phimoe.ModelArgs.from_dict(dict(config, lm_head_bias=True, tie_word_embeddings=True))
    with pytest.raises(ModelLoadError, match="config.json: rope type 'yarn' is not supported for phimoe"):
        phimoe.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    no_mscale = {k: v for k, v in rope.items() if k != "long_mscale"}
    with pytest.raises(ModelLoadError, match="config.json: longrope needs rope long_mscale"):
        phimoe.ModelArgs.from_dict(dict(config, rope_parameters=no_mscale))
    with pytest.raises(ModelLoadError, match="config.json: rope short_factor has 3 entries, expected head_dim / 2"):
        phimoe.ModelArgs.from_dict(dict(config, rope_parameters=dict(rope, short_factor=[1.0] * 3)))
    with pytest.raises(ModelLoadError, match="config.json: rope long_factor must be positive"):
        phimoe.ModelArgs.from_dict(dict(config, rope_parameters=dict(rope, long_factor=[0.0] * HALF)))
