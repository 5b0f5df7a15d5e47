"""LFM2-MoE: tiny configs for the shared parity checks, and its own tests (the gated short
convolution and the biased sigmoid router by hand, the conv state across calls, routing
and structure against transformers, config keys of older checkpoints, refusals).

The short convolution has no recurrence beyond its K-1 input window, so cached and
chunked runs compute exactly the full forward's sums: they are held to the shared 1e-4
(measured differences are ~1e-7)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import lfm2_moe
from edgemoe.models.attention import Attention
from edgemoe.models.moe import MoEBlock
from edgemoe.models.recurrent import ShortConv, StateCache, causal_conv
from edgemoe.models.routers import GroupedRouter

from models import parity
from models.parity import check_routing
from models.families.test_qwen3_next import make_pair

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512,
            hidden_size=64, num_attention_heads=4)

CONFIGS = {
    # Conv and attention layers alternating, GQA 2, one dense layer first, 4 experts top-2
    # chosen with the expert bias and weighted by renormalised sigmoid scores times 2.5,
    # kernel 3 without bias, tied embeddings (LFM2's default).
    "lfm2_moe-bias-scaled-tied": lambda: tf.Lfm2MoeConfig(
        **BASE, intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2,
        num_dense_layers=1, num_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
    ),
    # Attention first then three conv layers with biases and a 4-tap kernel, GQA 4, no
    # dense layer, 6 experts top-3 without expert bias or renormalisation, rope theta
    # 5000, untied head.
    "lfm2_moe-convbias-nodense-untied": lambda: tf.Lfm2MoeConfig(
        **BASE, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=4, num_key_value_heads=1,
        num_dense_layers=0, num_experts=6, num_experts_per_tok=3, use_expert_bias=False, norm_topk_prob=False,
        conv_bias=True, conv_L_cache=4, tie_word_embeddings=False,
        layer_types=["full_attention", "conv", "conv", "conv"],
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
}

TINY = dict(model_type="lfm2_moe", vocab_size=8, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return (*make_pair(CONFIGS[request.param], out), out)


@torch.no_grad()
def test_short_conv_by_hand():
    """hidden 1, b = c = x (in_proj all ones), taps (1, 2) on (previous, current): for
    x = 1, 2, 3 the conv sees b*x = 1, 4, 9 and gives 2, 1 + 8, 4 + 18 = 2, 9, 22; times
    c = x: 2, 18, 66. Fed one token at a time through a cache, the same."""
    conv = ShortConv(1, kernel=2, bias=False)
    conv.in_proj.weight.fill_(1.0)
    conv.out_proj.weight.fill_(1.0)
    conv.conv_weight.copy_(torch.tensor([[[1.0, 2.0]]]))
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    assert conv(x, None).flatten().tolist() == [2.0, 18.0, 66.0]
    cache = conv.make_cache(None)
    steps = [conv(x[:, t : t + 1], cache).item() for t in range(3)]
    assert steps == [2.0, 18.0, 66.0] and cache.offset == 3 and cache.conv.flatten().tolist() == [9.0]


def test_causal_conv_window_carries_over():
    """Convolving in pieces with the returned window equals one call: the window is the
    last K-1 inputs, zeros before the first."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 11, generator=g), torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
    whole, window = causal_conv(x, w, b, None)
    assert torch.equal(window, x[:, :, -3:])
    first, prev = causal_conv(x[:, :, :2], w, b, None)
    assert torch.equal(prev, torch.cat([torch.zeros(2, 5, 1), x[:, :, :2]], dim=-1))
    rest, _ = causal_conv(x[:, :, 2:], w, b, prev)
    torch.testing.assert_close(torch.cat([first, rest], dim=-1), whole, atol=1e-6, rtol=0)


def test_biased_sigmoid_router_by_hand():
    """x = 0 makes every logit 0 and every sigmoid score 0.5; the expert bias (0, -1, 0.5)
    makes the choice experts 2 then 0, but the weights are the unbiased scores, 0.5 each,
    renormalised (sum + 1e-6) and scaled by 2: 1 / (1 + 1e-6) each."""
    r = GroupedRouter(2, 3, 2, True, scoring="sigmoid", correction=True, norm_eps=1e-6, scaling=2.0)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        r.e_score_correction_bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
    weights, ids, logits = r(torch.zeros(1, 2))
    assert ids.tolist() == [[2, 0]] and logits.tolist() == [[0.0, 0.0, 0.0]]
    torch.testing.assert_close(weights, torch.full((1, 2), 1 / (1 + 1e-6)), atol=1e-7, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    routers = [layer.feed_forward.gate for layer in hf.model.layers if hasattr(layer.feed_forward, "gate")]
    check_routing(hf, model, routers)
    parity.check_logits(hf, model)  # with perturbed norms, biases and expert biases


def test_structure_matches_transformers(pair):
    """Conv and attention layers where transformers has them, dense layers first, the
    conv's kernel and biases, the router's options, a tied head by default."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        if cfg.layer_types[i] == "conv":
            assert isinstance(ours.attn, ShortConv) and ours.attn.kernel == theirs.conv.conv_kernel_size
            assert (ours.attn.conv_bias is not None) == cfg.conv_bias
        else:
            assert isinstance(ours.attn, Attention) and ours.attn.spec.qk_norm == "head"
        dense = i < cfg.num_dense_layers
        assert isinstance(ours.mlp, MoEBlock) != dense
        if not dense:
            router = ours.mlp.router
            assert router.scaling == cfg.routed_scaling_factor and router.norm_topk == cfg.norm_topk_prob
            assert (router.e_score_correction_bias is not None) == cfg.use_expert_bias
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
    assert model.state_bytes() == cfg.layer_types.count("conv") * cfg.hidden_size * (cfg.conv_L_cache - 1) * 4
    cache = model.make_cache()
    model(parity.prompt_ids(cfg.vocab_size)[:, :5], cache)
    assert sum(c.conv.nbytes for c in cache if isinstance(c, StateCache)) == model.state_bytes()


def test_older_config_keys():
    """full_attn_idxs instead of layer_types, tie_embedding, norm_eps; no rope key at all
    means LFM2's theta 1e6."""
    args = lfm2_moe.ModelArgs.from_dict(dict(TINY, full_attn_idxs=[1], tie_embedding=False, norm_eps=1e-4))
    assert args.layer_types == ["conv", "full_attention", "conv"]
    assert not args.tie_word_embeddings and args.rms_norm_eps == 1e-4 and args.rope_theta == 1e6
    assert args.moe_layers() == [2]  # two dense layers by default


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: layer_types \\(or full_attn_idxs\\) is required"):
        lfm2_moe.ModelArgs.from_dict(TINY)
    with pytest.raises(ModelLoadError, match="config.json: unsupported layer_types entries: mamba"):
        lfm2_moe.ModelArgs.from_dict(dict(config, layer_types=["mamba"] * config["num_hidden_layers"]))
    with pytest.raises(ModelLoadError, match="config.json: layer_types has 2 entries for 4 layers"):
        lfm2_moe.ModelArgs.from_dict(dict(config, layer_types=["conv", "conv"]))
    with pytest.raises(ModelLoadError, match="config.json: conv_L_cache must be positive"):
        lfm2_moe.ModelArgs.from_dict(dict(config, conv_L_cache=0))
    with pytest.raises(ModelLoadError, match="config.json: num_experts_per_tok .* must be between 1"):
        lfm2_moe.ModelArgs.from_dict(dict(config, num_experts_per_tok=9))
