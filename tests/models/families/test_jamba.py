"""Jamba: tiny configs for the shared parity checks, and its own tests (the selective scan
by hand, prefill in pieces against the one-token recurrence and transformers, routing and
the attention/Mamba and MoE/dense layer structure against transformers, the state's
size, refusals).

Mamba-1's scan is the recurrence itself, one token at a time whatever the prompt length
(only the discretisation is batched), so a prompt prefilled in pieces computes the very
same operations as token by token: the shared 1e-4 holds with room to spare."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import jamba
from edgemoe.models.attention import Attention
from edgemoe.models.mamba import Mamba, selective_scan
from edgemoe.models.moe import MoEBlock
from edgemoe.models.recurrent import StateCache

from models import parity
from models.parity import check_routing
from models.families.test_qwen3_next import make_pair

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512,
            hidden_size=64, num_attention_heads=4)

CONFIGS = {
    # Attention on odd layers, experts on odd layers (so both kinds of mixer meet both kinds
    # of MLP), 4 experts top-2 with raw weights, state 8, dt rank "auto" (4), conv bias,
    # no projection biases, GQA 2, untied.
    "jamba-attn2-moe2": lambda: tf.JambaConfig(
        **BASE, intermediate_size=48, num_hidden_layers=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=8, tie_word_embeddings=False,
    ),
    # Attention on layers 0 and 3, experts on layers 2 and 5 of 6, 5 experts top-3,
    # projection biases without conv bias, dt rank 6, expand 3, 3-tap conv, state 4,
    # GQA 4, tied embeddings.
    "jamba-attn3-projbias-tied": lambda: tf.JambaConfig(
        **BASE, intermediate_size=40, num_hidden_layers=6, num_key_value_heads=1, num_experts=5,
        num_experts_per_tok=3, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=3,
        expert_layer_offset=2, mamba_d_state=4, mamba_dt_rank=6, mamba_expand=3, mamba_d_conv=3,
        mamba_conv_bias=False, mamba_proj_bias=True, tie_word_embeddings=True,
    ),
}

TINY = dict(model_type="jamba", vocab_size=8, hidden_size=40, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (*make_pair(CONFIGS[request.param], out), out)


def test_selective_scan_by_hand():
    """One channel, one state, A = -ln 2 and dt = 1 (the state halves each step), B = 2,
    C = 3: u = 1 gives S = 2, y = 6; u = 0 then gives S = 1, y = 3; u = 4 with dt = 0.5
    (decay 2^-0.5) gives S = 2^-0.5 + 0.5 * 2 * 4, y = 3 S."""
    u = torch.tensor([[[1.0], [0.0], [4.0]]])
    dt = torch.tensor([[[1.0], [1.0], [0.5]]])
    A = torch.tensor([[-math.log(2.0)]])
    Bm, Cm = torch.full((1, 3, 1), 2.0), torch.full((1, 3, 1), 3.0)
    for chunk in (1, 2, 3):
        y, S = selective_scan(u, dt, A, Bm, Cm, torch.zeros(1, 1, 1), chunk)
        last = 2**-0.5 + 4.0
        torch.testing.assert_close(y.flatten(), torch.tensor([6.0, 3.0, 3 * last]), atol=1e-6, rtol=0)
        torch.testing.assert_close(S.flatten(), torch.tensor([last]), atol=1e-6, rtol=0)


def test_prefill_in_pieces_matches_transformers(pair, monkeypatch):
    """With 3-token discretisation chunks, our logits are transformers', and a prompt
    prefilled in pieces then decoded token by token matches one forward."""
    hf, model, _ = pair
    monkeypatch.setattr(Mamba, "CHUNK", 3)
    parity.check_logits(hf, model)
    parity.check_incremental(model)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    routers = [layer.feed_forward.router for layer in hf.model.layers if hasattr(layer.feed_forward, "router")]
    check_routing(hf, model, routers)
    parity.check_logits(hf, model)  # with perturbed norms, biases and D


def test_structure_matches_transformers(pair):
    """Attention (without RoPE) and Mamba layers, MoE and dense layers where transformers
    has them; the Mamba shapes; a state of a fixed size per sequence."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        if cfg.layers_block_type[i] == "attention":
            assert isinstance(ours.attn, Attention) and not ours.attn.spec.use_rope
        else:
            assert isinstance(ours.attn, Mamba) and ours.attn.dt_rank == theirs.mamba.time_step_rank
            assert ours.attn.inner == theirs.mamba.intermediate_size and ours.attn.d_conv == cfg.mamba_d_conv
            assert (ours.attn.conv_bias is not None) == cfg.mamba_conv_bias
            assert (ours.attn.in_proj.bias is not None) == cfg.mamba_proj_bias
        assert isinstance(ours.mlp, MoEBlock) == (cfg.layers_num_experts[i] > 1)
        if isinstance(ours.mlp, MoEBlock):
            assert not ours.mlp.router.norm_topk
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
    cache = model.make_cache()
    model(parity.prompt_ids(cfg.vocab_size)[:, :5], cache)
    held = sum(c.conv.nbytes + c.state.nbytes for c in cache if isinstance(c, StateCache))
    assert held == model.state_bytes() > 0


def test_config_rules():
    """dt rank "auto" is ceil(hidden / 16); one expert per layer means every layer is dense."""
    args = jamba.ModelArgs.from_dict(dict(TINY, attn_layer_period=2, attn_layer_offset=0))
    assert args.dt_rank == 3 and args.moe_layers() == [1, 3] and args.is_attention(2)
    assert jamba.ModelArgs.from_dict(dict(TINY, num_experts=1, num_experts_per_tok=1)).moe_layers() == []


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"config.json: attn_layer_offset \(3\) must be smaller than "
                                             r"attn_layer_period \(3\)"):
        jamba.ModelArgs.from_dict(dict(config, attn_layer_period=3, attn_layer_offset=3))
    with pytest.raises(ModelLoadError, match="config.json: expert_layer_offset"):
        jamba.ModelArgs.from_dict(dict(config, expert_layer_period=1, expert_layer_offset=1))
    with pytest.raises(ModelLoadError, match="config.json: mamba_dt_rank must be a positive integer or \"auto\""):
        jamba.ModelArgs.from_dict(dict(config, mamba_dt_rank="wide"))
    with pytest.raises(ModelLoadError, match="config.json: mamba_d_state must be positive"):
        jamba.ModelArgs.from_dict(dict(config, mamba_d_state=0))
    with pytest.raises(ModelLoadError, match="config.json: hidden_act 'tanh' is not supported"):
        jamba.ModelArgs.from_dict(dict(config, hidden_act="tanh"))
