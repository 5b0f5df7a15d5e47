"""Qwen3-Next: tiny configs for the shared parity checks, and its own tests (the gated
delta rule by hand and chunked against the token-by-token recurrence, chunk boundaries
against transformers, routing and structure against transformers, the per-layer state
cache: bytes, trimming, context limit and prefix reuse, refusals).

Tolerances: fp32 logits are held to the shared 1e-4. The chunked delta rule computes the
same sums as the recurrence in another order (a triangular solve instead of a running
update), so the two differ by fp32 rounding only: relative errors of a few 1e-7 per
operation, grown by at most the chunk length; 1e-5 on O(1) outputs leaves a wide margin
while any algebra error (a wrong decay, a missing beta) is O(1e-1)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ContextLengthError, ModelLoadError
from edgemoe.generate import PromptCache
from edgemoe.models import qwen3_next
from edgemoe.models.attention import Attention, KVCache
from edgemoe.models.moe import MoEBlock
from edgemoe.models.recurrent import (GatedDeltaNet, StateCache, StateTrimError, delta_rule_chunked, delta_rule_step,
                                      l2norm)

from models import parity
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)
LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8)

CONFIGS = {
    # Default layer pattern (full attention every 4th layer), 2 value heads per key head
    # (grouped projections), GQA 2, head_dim 16 with a quarter rotated (4 channels), a
    # shared expert, raw top-k weights, a dense layer by mlp_only_layers, untied head.
    "qwen3_next-grouped-dense": lambda: tf.Qwen3NextConfig(
        **BASE, **LINEAR, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=24, norm_topk_prob=False,
        mlp_only_layers=[1], tie_word_embeddings=False,
    ),
    # Explicit layer_types starting with full attention, one value head per key head with
    # dk != dv, conv kernel 3, half of head_dim 24 rotated with linear scaling, GQA 4, 6
    # experts top-3 renormalised, no shared expert, MoE every second layer
    # (decoder_sparse_step 2), tied embeddings.
    "qwen3_next-ungrouped-sparse2-tied": lambda: tf.Qwen3NextConfig(
        **BASE, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, linear_num_key_heads=3, linear_num_value_heads=3,
        linear_key_head_dim=12, linear_value_head_dim=8, linear_conv_kernel_dim=3, num_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=20, shared_expert_intermediate_size=0, norm_topk_prob=True,
        decoder_sparse_step=2, tie_word_embeddings=True,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
}


def perturb(hf, seed: int = 5) -> None:
    """Add noise to every 1-D parameter (norm weights, biases, dt_bias, D, A_log, expert
    biases): transformers initialises most of them to constants (norm offsets 0, dt_bias
    1, D 1), where one loaded into the wrong place would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def make_pair(factory, out):
    """Save a tiny transformers model with perturbed 1-D parameters; load it with edgemoe."""
    hf = parity.save(factory(), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (*make_pair(CONFIGS[request.param], out), out)


# ----------------------------------------------------------------------------- the delta rule


def test_delta_rule_by_hand():
    """dk = 2, dv = 1, one head. Token 1: k = (1, 0), v = 2, beta = 0.5, no decay: the
    empty state predicts 0, so it stores 0.5 * (2 - 0) = 1 under k; q = (1, 0) reads 1.
    Token 2: the state decays by 0.5 (to 0.5), k = (1, 0) predicts 0.5, v = 4, beta = 1
    writes 3.5 more: 4; q = (1, 0) reads 4 and q = (0, 1) reads 0."""
    S = torch.zeros(1, 1, 2, 1)
    one = torch.ones(1, 1)
    o, S = delta_rule_step(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0]]]),
                           0 * one, 0.5 * one, S)
    assert o.tolist() == [[[1.0]]] and S.flatten().tolist() == [1.0, 0.0]
    k2, v2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[4.0]]])
    o, S = delta_rule_step(torch.tensor([[[1.0, 0.0]]]), k2, v2, math.log(0.5) * one, one, S)
    assert o.tolist() == [[[4.0]]] and S.flatten().tolist() == [4.0, 0.0]
    o, _ = delta_rule_step(torch.tensor([[[0.0, 1.0]]]), k2, v2, math.log(0.5) * one, one, S)
    assert o.tolist() == [[[0.0]]]


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_delta_rule_matches_recurrence(chunk):
    """Any chunking (sizes that divide T, that don't, and one chunk) equals token-by-token
    steps from a non-zero initial state, outputs and final state (see the module docstring
    for the tolerance)."""
    g = torch.Generator().manual_seed(0)
    B, h, T, dk, dv = 2, 3, 19, 8, 5
    q = l2norm(torch.randn(B, h, T, dk, generator=g)) * dk**-0.5
    k = l2norm(torch.randn(B, h, T, dk, generator=g))
    v = torch.randn(B, h, T, dv, generator=g)
    decay = -torch.rand(B, h, T, generator=g) * 3  # log decays in (-3, 0]
    beta = torch.rand(B, h, T, generator=g)
    S0 = torch.randn(B, h, dk, dv, generator=g)
    S, steps = S0, []
    for t in range(T):
        o, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], decay[:, :, t], beta[:, :, t], S)
        steps.append(o)
    out, S_chunked = delta_rule_chunked(q, k, v, decay, beta, S0, chunk)
    torch.testing.assert_close(out, torch.stack(steps, dim=2), atol=1e-5, rtol=0)
    torch.testing.assert_close(S_chunked, S, atol=1e-5, rtol=0)


def test_chunk_boundaries_match_transformers(pair, monkeypatch):
    """transformers runs the test sequence as one 64-token chunk; with 4-token chunks ours
    crosses five chunk boundaries and still gives its logits, in one forward and cached."""
    hf, model, _ = pair
    monkeypatch.setattr(GatedDeltaNet, "CHUNK", 4)
    parity.check_logits(hf, model)
    parity.check_incremental(model)


# ----------------------------------------------------------------------------- against transformers


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")
                              and hasattr(layer.mlp, "experts")])
    parity.check_logits(hf, model)  # with perturbed norms, dt_bias and A_log


def test_structure_matches_transformers(pair):
    """Mixer kinds, MoE/dense layers, shared experts, zero-centred norms and the rotated
    channels match transformers' model."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        if cfg.layer_types[i] == "full_attention":
            assert isinstance(ours.attn, Attention) and ours.attn.spec.query_gate
            assert isinstance(ours.attn.q_norm, qwen3_next.OffsetRMSNorm)
        else:
            assert isinstance(ours.attn, GatedDeltaNet) and ours.attn.grouped and hasattr(theirs, "linear_attn")
            assert (ours.attn.nk, ours.attn.nv) == (theirs.linear_attn.num_k_heads, theirs.linear_attn.num_v_heads)
        moe = hasattr(theirs.mlp, "experts")
        assert isinstance(ours.mlp, MoEBlock) == moe
        if moe:
            assert (ours.mlp.shared is not None) == (cfg.shared_expert_intermediate_size > 0)
            assert ours.mlp.router.norm_topk == cfg.norm_topk_prob
        assert isinstance(ours.norm1, qwen3_next.OffsetRMSNorm)
    assert isinstance(model.norm, qwen3_next.OffsetRMSNorm)
    rotated = model.args.rotary_dim
    assert rotated == hf.model.rotary_emb.inv_freq.numel() * 2
    torch.testing.assert_close(model.layers[cfg.layer_types.index("full_attention")].attn.rope.inv_freq,
                               hf.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)


# ----------------------------------------------------------------------------- the state cache


@torch.no_grad()
def test_state_bytes_and_kv_bytes(pair):
    """state_bytes is exactly what the recurrent layers hold after a forward (a fixed
    size, the same after 3 tokens as after 20); kv_bytes_per_token counts only the
    attention layers."""
    _, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size)
    for n in (3, 20):
        cache = model.make_cache()
        model(ids[:, :n], cache)
        held = sum(c.conv.nbytes + c.state.nbytes for c in cache if isinstance(c, StateCache))
        assert held == model.state_bytes() > 0
    args = model.args
    attn_layers = args.layer_types.count("full_attention")
    assert model.kv_bytes_per_token() == attn_layers * 2 * args.num_key_value_heads * args.head_dim * 4


@torch.no_grad()
def test_state_cache_trim_and_context(pair):
    """A state can only be forgotten entirely: trim(0) keeps it, a partial trim raises
    StateTrimError, a full trim starts a fresh sequence; a step past the capacity raises
    ContextLengthError before touching the state."""
    _, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size)
    full = model(ids)
    cache = model.make_cache(capacity=ids.shape[1])
    model(ids[:, :6], cache)
    states = [c for c in cache if isinstance(c, StateCache)]
    assert states and not states[0].can_trim
    states[0].trim(0)
    assert states[0].offset == 6
    with pytest.raises(StateTrimError, match="cannot be trimmed from 6 to 4"):
        states[0].trim(2)
    for c in cache:
        c.trim(c.offset)
    torch.testing.assert_close(model(ids, cache), full, atol=1e-4, rtol=0)
    before = states[0].state.clone()
    with pytest.raises(ContextLengthError, match="context is full"):
        model(ids[:, :1], cache)
    assert torch.equal(states[0].state, before) and states[0].offset == ids.shape[1]


@torch.no_grad()
def test_prefix_reuse_that_only_extends(pair):
    """A follow-up prompt that extends the cached tokens reuses the cache without any
    trim (the recurrent state is exactly where it should be) and gives a fresh run's logits."""
    _, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size)[0].tolist()
    cache = PromptCache(model)
    model(torch.tensor([ids[:8]]), cache.layers)
    cache.tokens = ids[:8]
    assert cache.reuse(ids) == 8
    got = model(torch.tensor([ids[8:]]), cache.layers)
    torch.testing.assert_close(got, model(torch.tensor([ids]))[:, 8:], atol=1e-4, rtol=0)
    assert all(isinstance(c, (KVCache, StateCache)) for c in cache.layers)


# ----------------------------------------------------------------------------- config


def test_default_layer_types_and_partial_rotary():
    """Without layer_types every full_attention_interval-th layer is full attention; the
    rotated fraction is read from the rope parameters (default a quarter)."""
    base = dict(model_type="qwen3_next", vocab_size=8, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                head_dim=8, num_experts=2, num_experts_per_tok=1)
    args = qwen3_next.ModelArgs.from_dict(dict(base, full_attention_interval=3))
    assert args.layer_types == ["linear_attention", "linear_attention", "full_attention"] * 2
    assert args.rotary_dim == 2
    args = qwen3_next.ModelArgs.from_dict(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                      "partial_rotary_factor": 0.5}))
    assert args.rotary_dim == 4 and args.rope_theta == 1e6


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    n = config["num_hidden_layers"]
    bad = {
        "attention_bias": (True, "attention_bias true is not supported"),
        "layer_types": (["linear_attention"] * (n - 1) + ["sliding_attention"],
                        "unsupported layer_types entries: sliding_attention"),
        "linear_num_value_heads": (config["linear_num_key_heads"] + 1, "is not a multiple of linear_num_key_heads"),
        "partial_rotary_factor": (0.05, "RoPE needs a positive even number"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ModelLoadError, match=f"config.json: .*{message}"):
            qwen3_next.ModelArgs.from_dict(dict(config, **{key: value}))
    with pytest.raises(ModelLoadError, match=f"config.json: layer_types has 1 entries for {n} layers"):
        qwen3_next.ModelArgs.from_dict(dict(config, layer_types=["full_attention"]))


def test_sanitize_skips_mtp_and_maps_deltanet_names():
    w = torch.zeros(2, 2)
    assert qwen3_next.sanitize("mtp.layers.0.mlp.gate.weight", w) == []
    assert qwen3_next.sanitize("model.layers.3.linear_attn.in_proj_qkvz.weight", w)[0][0] == (
        "layers.3.attn.in_qkvz.weight")
    assert qwen3_next.sanitize("model.layers.3.linear_attn.conv1d.weight", w)[0][0] == "layers.3.attn.conv_weight"
    assert qwen3_next.sanitize("model.layers.3.linear_attn.out_proj.weight", w)[0][0] == "layers.3.attn.out.weight"
