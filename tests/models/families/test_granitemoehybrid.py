"""Granite 4.0-H (granitemoehybrid): tiny configs for the shared parity checks, and its own
tests (the Mamba-2 scan and its grouped gated norm by hand, the chunked scan against the
one-token recurrence and transformers, dt limits, routing and structure against
transformers, legacy config names, refusals).

Tolerance of the chunked scan: it sums exp(c_t - c_s) (C_t . B_s) dt_s x_s in another
order than the recurrence (a masked matrix product instead of a running state), so the
two differ by fp32 rounding only, about 1e-7 relative per term times the chunk length;
1e-5 on O(1) outputs is a wide margin, while a wrong decay or a missing dt is O(1e-1)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import granitemoehybrid
from edgemoe.models.attention import Attention
from edgemoe.models.mamba import GroupedGatedRMSNorm, Mamba2, ssd_chunked, ssd_step
from edgemoe.models.moe import MoEBlock
from edgemoe.models.recurrent import StateCache

from models import parity
from models.parity import check_routing
from models.families.test_qwen3_next import make_pair

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512,
            num_attention_heads=4)

CONFIGS = {
    # Mamba-2 layers around one attention layer without positional encoding, 8 heads in
    # 2 groups (head dim "auto" = 16), state 8, conv bias, every Granite multiplier away
    # from 1, 4 experts top-2 plus a shared MLP, GQA 2, untied.
    "granitemoehybrid-nope-groups2": lambda: tf.GraniteMoeHybridConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24, mamba_n_heads=8, mamba_n_groups=2,
        mamba_d_state=8, mamba_d_head="auto", layer_types=["linear_attention", "full_attention", "linear_attention",
                                                          "linear_attention"],
        embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.4, logits_scaling=3.0,
        tie_word_embeddings=False,
    ),
    # RoPE (linear scaling) on two attention layers with biases, MHA, Mamba-2 with
    # projection biases and no conv bias, 6 heads of 16 in one group, state 4, a 3-tap
    # conv, scan chunks of 8 (the 20-token test prompts span three), 6 experts top-3, tied.
    "granitemoehybrid-rope-bias-chunk8-tied": lambda: tf.GraniteMoeHybridConfig(
        **BASE, hidden_size=48, intermediate_size=24, num_hidden_layers=4, num_key_value_heads=4,
        num_local_experts=6, num_experts_per_tok=3, shared_intermediate_size=16, mamba_n_heads=6, mamba_n_groups=1,
        mamba_d_state=4, mamba_d_head=16, mamba_d_conv=3, mamba_chunk_size=8, mamba_conv_bias=False,
        mamba_proj_bias=True, attention_bias=True, position_embedding_type="rope",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=2.0,
        tie_word_embeddings=True,
    ),
}

TINY = dict(model_type="granitemoehybrid", vocab_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
            num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_state=4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (*make_pair(CONFIGS[request.param], out), out)


def test_ssd_step_by_hand():
    """One head of one channel, A = -ln 2 with dt = 1 (the state halves), B = 2, C = 3:
    x = 1 gives S = 2, y = 6; x = 0 then S = 1, y = 3. The chunked form agrees."""
    A = torch.tensor([-math.log(2.0)])
    Bm, Cm, one = torch.full((1, 1, 1), 2.0), torch.full((1, 1, 1), 3.0), torch.ones(1, 1)
    y, S = ssd_step(torch.ones(1, 1, 1), one, A, Bm, Cm, torch.zeros(1, 1, 1, 1))
    assert y.item() == pytest.approx(6.0) and S.item() == pytest.approx(2.0)
    y, S = ssd_step(torch.zeros(1, 1, 1), one, A, Bm, Cm, S)
    assert y.item() == pytest.approx(3.0) and S.item() == pytest.approx(1.0)
    x = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    y, S = ssd_chunked(x, torch.ones(1, 2, 1), A, torch.full((1, 2, 1, 1), 2.0), torch.full((1, 2, 1, 1), 3.0),
                       torch.zeros(1, 1, 1, 1), chunk=2)
    torch.testing.assert_close(y.flatten(), torch.tensor([6.0, 3.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_scan_matches_recurrence(chunk, groups):
    """Any chunking equals token-by-token steps from a non-zero state, with B and C per
    head (3 groups of 1) or shared by all heads (1 group of 3); and a group's B and C act
    as that many per-head copies (module docstring for the tolerance)."""
    g = torch.Generator().manual_seed(0)
    B, T, h, p, n = 2, 19, 3, 4, 5
    x = torch.randn(B, T, h, p, generator=g)
    Bm, Cm = torch.randn(B, T, groups, n, generator=g), torch.randn(B, T, groups, n, generator=g)
    dt = torch.rand(B, T, h, generator=g) * 2
    A = -torch.rand(h, generator=g) * 2
    S0 = torch.randn(B, h, p, n, generator=g)
    S, steps = S0, []
    for t in range(T):
        y, S = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], S)
        steps.append(y)
    out, S_chunked = ssd_chunked(x, dt, A, Bm, Cm, S0, chunk)
    torch.testing.assert_close(out, torch.stack(steps, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(S_chunked, S, atol=1e-5, rtol=0)
    per_head = [t.repeat_interleave(h // groups, dim=2) for t in (Bm, Cm)]  # (B, T, h, n)
    out_heads, _ = ssd_chunked(x, dt, A, *per_head, S0, chunk)
    torch.testing.assert_close(out_heads, out, atol=1e-5, rtol=0)


@torch.no_grad()
def test_grouped_gated_norm_by_hand():
    """Groups of 2: x = (3, 4 | 1, 1) times silu(gate) (a constant here, so it cancels in
    each group's RMS) normalises to (3, 4) / sqrt(12.5) and (1, 1), then times the weight."""
    norm = GroupedGatedRMSNorm(4, 2, eps=0.0)
    norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = norm(torch.tensor([[3.0, 4.0, 1.0, 1.0]]), torch.full((1, 4), 2.0))
    r = math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3 / r, 8 / r, 3.0, 4.0]]), atol=1e-6, rtol=0)


@torch.no_grad()
def test_dt_limit_clamps_prefill_and_decode_alike():
    """A finite time_step_limit clamps dt in the chunked scan and the one-token step
    alike (prefill and decode agree), and it changes the result."""
    torch.manual_seed(0)
    kw = dict(hidden=8, inner=16, heads=4, head_dim=4, groups=2, d_state=3, d_conv=3, conv_bias=True,
              proj_bias=False, act="silu", eps=1e-6, chunk=4)
    free, clamped = Mamba2(**kw, dt_limit=(0.0, math.inf)), Mamba2(**kw, dt_limit=(0.0, 0.05))
    for p in free.parameters():
        p.copy_(torch.randn(p.shape) * 0.5)
    clamped.load_state_dict(free.state_dict())
    x = torch.randn(1, 9, 8)
    full = clamped(x, None)
    cache = clamped.make_cache(None)
    steps = torch.cat([clamped(x[:, :5], cache)] + [clamped(x[:, t : t + 1], cache) for t in range(5, 9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert (free(x, None) - full).abs().max() > 1e-3


def test_chunk_boundaries_match_transformers(pair, monkeypatch):
    """With 3-token scan chunks ours crosses chunk boundaries transformers' does not (or
    others than its own), in one forward and cached, and still gives its logits."""
    hf, model, _ = pair
    for layer in model.layers:
        if isinstance(layer.attn, Mamba2):
            monkeypatch.setattr(layer.attn, "chunk", 3)
    parity.check_logits(hf, model)
    parity.check_incremental(model)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.block_sparse_moe.router for layer in hf.model.layers])
    parity.check_logits(hf, model)  # with perturbed norms, biases, dt_bias and D


def test_structure_matches_transformers(pair):
    """Mamba-2 and attention layers where transformers has them, RoPE only with
    position_embedding_type "rope", the multipliers, a shared MLP next to the experts,
    the Mamba shapes and a fixed-size state."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        assert isinstance(ours.mlp, MoEBlock) and ours.mlp.shared.gate.out_features == cfg.shared_intermediate_size
        assert ours.residual_scale == cfg.residual_multiplier
        if cfg.layer_types[i] == "full_attention":
            assert isinstance(ours.attn, Attention) and theirs.self_attn is not None
            assert ours.attn.spec.use_rope == (cfg.position_embedding_type == "rope")
            assert ours.attn.spec.scale == cfg.attention_multiplier
        else:
            m = theirs.mamba
            assert isinstance(ours.attn, Mamba2) and ours.attn.chunk == cfg.mamba_chunk_size
            assert (ours.attn.heads, ours.attn.head_dim, ours.attn.groups) == (m.num_heads, m.head_dim, m.n_groups)
            assert (ours.attn.conv_bias is not None) == cfg.mamba_conv_bias
    assert model.embed_scale == cfg.embedding_multiplier and model.logits_scale == pytest.approx(1 / cfg.logits_scaling)
    cache = model.make_cache()
    model(parity.prompt_ids(cfg.vocab_size)[:, :5], cache)
    held = sum(c.conv.nbytes + c.state.nbytes for c in cache if isinstance(c, StateCache))
    assert held == model.state_bytes() > 0


def test_config_keys():
    """Legacy layer names under layers_block_type, transformers' all-Mamba default, the
    head dim "auto", and the ways a time_step_limit may be written."""
    args = granitemoehybrid.ModelArgs.from_dict(dict(TINY, layers_block_type=["mamba", "attention", "mamba"]))
    assert args.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    args = granitemoehybrid.ModelArgs.from_dict(dict(TINY, time_step_limit=[0.0, {"__float__": "Infinity"}]))
    assert args.layer_types == ["linear_attention"] * 3 and args.mamba_head_dim == 8
    assert args.time_step_limit == (0.0, math.inf)
    for value in ([0.001, "Infinity"], [0, 0.1]):
        args = granitemoehybrid.ModelArgs.from_dict(dict(TINY, time_step_limit=value))
        assert args.time_step_limit[0] in (0.0, 0.001) and args.time_step_limit[1] in (math.inf, 0.1)


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    bad = {
        "num_local_experts": (0, "num_local_experts 0 .* has no experts to offload"),
        "position_embedding_type": ("alibi", "position_embedding_type 'alibi' is not supported"),
        "mamba_d_head": (5, r"mamba_n_heads \(\d+\) x mamba_d_head \(5\) must equal"),
        "mamba_n_groups": (5, r"mamba_n_heads \(\d+\) is not a multiple of mamba_n_groups \(5\)"),
        "time_step_limit": ([1.0, 0.5], "time_step_limit must be a pair"),
        "layer_types": (["mamba2"] * config["num_hidden_layers"], "unsupported layer_types entries: mamba2"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ModelLoadError, match=f"config.json: {message}"):
            granitemoehybrid.ModelArgs.from_dict(dict(config, **{key: value}))
