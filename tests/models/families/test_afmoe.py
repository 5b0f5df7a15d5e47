"""AFMoE: tiny configs for the shared parity checks, and its own tests (sigmoid routing
with a choice-only bias by hand, routing with trained-looking routers and the sandwich-norm,
gated-attention, NoPE/sliding structure against transformers, refusals).

transformers initialises AFMoE's router weights and expert biases to zero, so the parity
configs route every token alike; the tests here randomise them first."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import afmoe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock

from models import parity
from models.families.test_exaone_moe import check_routing, pair_with_biased_routers

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # 4 layers: one dense, then MoE; sliding (RoPE, window 8) / global (NoPE) alternating;
    # 8 experts top-2 x route_scale 2, one shared expert, muP embedding scaling,
    # biases on all attention projections, GQA 2.
    "afmoe-hybrid-mup-bias": lambda: tf.AfmoeConfig(
        **BASE, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_dense_layers=1, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, global_attn_every_n_layers=2,
        sliding_window=8, mup_enabled=True, attention_bias=True, tie_word_embeddings=False,
    ),
    # Explicit layer_types (sliding, sliding, global), two dense layers, 6 experts top-3,
    # two shared experts' width, no muP, MHA with head_dim 12, tied embeddings, linear rope.
    "afmoe-types-dense2-tied": lambda: tf.AfmoeConfig(
        **BASE, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, head_dim=12, moe_intermediate_size=24, num_dense_layers=2, num_experts=6,
        num_experts_per_tok=3, num_shared_experts=2, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}


def hf_routers(hf):
    return [layer.mlp.router for layer in hf.model.layers if hasattr(layer.mlp, "router")]


def hf_router_params(hf):
    """(router weight, expert_bias) per MoE layer; the bias sits on the block, not the router."""
    return [(layer.mlp.router.gate.weight, layer.mlp.expert_bias)
            for layer in hf.model.layers if hasattr(layer.mlp, "router")]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return pair_with_biased_routers(CONFIGS[request.param](), out, hf_router_params)


def test_sigmoid_routing_by_hand():
    """Scores sigmoid(logits) = (0.8, 0.5, 0.2, 0.5), bias (0, -0.5, 0.7, 0): the choice
    scores (0.8, 0.0, 0.9, 0.5) pick experts 2 and 0, whose uncorrected scores 0.2 and
    0.8 are renormalised (always, in AFMoE) and scaled by route_scale 2: 0.4 and 1.6."""
    args = afmoe.ModelArgs.from_dict(dict(
        model_type="afmoe", vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, head_dim=4,
        intermediate_size=8, moe_intermediate_size=4, num_experts=4, num_experts_per_tok=2, route_scale=2.0,
        num_dense_layers=1, sliding_window=4))
    router = afmoe.build(args).layers[1].mlp.router
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[math.log(4.0)] * 8, [0.0] * 8, [-math.log(4.0)] * 8, [0.0] * 8]) / 8)
        router.e_score_correction_bias.copy_(torch.tensor([0.0, -0.5, 0.7, 0.0]))
    weights, ids, _ = router(torch.ones(1, 8))
    ids, order = ids.sort(dim=-1)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights.gather(1, order), torch.tensor([[1.6, 0.4]]))


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, hf_routers(hf))


def test_logits_match_transformers_with_trained_routers(pair):
    hf, model, _ = pair
    parity.check_logits(hf, model)
    parity.check_incremental(model)


def test_structure_matches_transformers(pair):
    """Dense/MoE layers, shared width, windows, RoPE only on sliding layers, the output
    gate, attention biases and the muP embedding scale as transformers builds them."""
    hf, model, _ = pair
    cfg = hf.config
    moe = [i for i, layer in enumerate(hf.model.layers) if layer.moe_enabled]
    assert model.args.moe_layers() == moe and 0 < len(moe) < cfg.num_hidden_layers
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        local = theirs.self_attn.is_local_attention
        assert isinstance(ours, afmoe.SandwichDecoderLayer)
        assert ours.attn.spec.sliding_window == theirs.self_attn.sliding_window
        assert ours.attn.spec.use_rope == local
        assert ours.attn.gate.weight.shape == theirs.self_attn.gate_proj.weight.shape
        assert (ours.attn.o.bias is not None) == (theirs.self_attn.o_proj.bias is not None) == cfg.attention_bias
        if i in moe:
            assert isinstance(ours.mlp, MoEBlock) and ours.mlp.router.scaling == cfg.route_scale
            assert ours.mlp.shared.gate.weight.shape == theirs.mlp.shared_experts.gate_proj.weight.shape
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.gate.weight.shape == theirs.mlp.gate_proj.weight.shape
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    assert model.embed_scale == (cfg.hidden_size**0.5 if cfg.mup_enabled else None)


def test_checkpoint_names():
    t = torch.zeros(4)
    names = {
        "model.layers.1.mlp.expert_bias": "layers.1.mlp.router.e_score_correction_bias",
        "model.layers.1.mlp.router.gate.weight": "layers.1.mlp.router.weight",
        "model.layers.1.self_attn.gate_proj.weight": "layers.1.attn.gate.weight",
        "model.layers.1.input_layernorm.weight": "layers.1.norm1.weight",
        "model.layers.1.post_attention_layernorm.weight": "layers.1.post_attn_norm.weight",
        "model.layers.1.pre_mlp_layernorm.weight": "layers.1.norm2.weight",
        "model.layers.1.post_mlp_layernorm.weight": "layers.1.post_mlp_norm.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight": "layers.1.mlp.shared.up.weight",
    }
    for name, want in names.items():
        assert afmoe.sanitize(name, t) == [(want, t)]
    assert afmoe.sanitize("model.layers.1.mlp.shared_experts.up_proj.weight", torch.zeros(0, 4)) == []


def test_defaults_match_transformers():
    """A config.json that leaves everything optional out gets transformers' defaults."""
    given = dict(vocab_size=384, hidden_size=256, num_hidden_layers=6, num_attention_heads=8)
    args = afmoe.ModelArgs.from_dict(dict(given, model_type="afmoe"))
    cfg = tf.AfmoeConfig(**given)
    fields = (
        "num_key_value_heads", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
        "num_shared_experts", "num_dense_layers", "route_scale", "sliding_window", "layer_types", "attention_bias",
        "mup_enabled", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    )
    for field in fields:
        assert getattr(args, field) == getattr(cfg, field), field
    assert args.head_dim == getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    assert args.rope_theta == cfg.rope_parameters["rope_theta"] and args.rope_scaling is None
    assert args.moe_layers() == list(range(cfg.num_dense_layers, 6))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    no_types = {k: v for k, v in config.items() if k != "layer_types"}
    cases = [
        (dict(no_types, global_attn_every_n_layers=None), "global_attn_every_n_layers is null"),
        (dict(config, layer_types=["chunked_attention"] * config["num_hidden_layers"]),
         "unsupported layer_types entries: chunked_attention"),
        (dict(config, layer_types=["full_attention"]), "layer_types has 1 entries"),
        (dict(config, sliding_window=None), "layer_types has sliding_attention layers but sliding_window is null"),
        (dict(config, num_dense_layers=None), "num_dense_layers must be an integer"),
        (dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    ]
    for bad, message in cases:
        with pytest.raises(ModelLoadError, match="config.json: " + message):
            afmoe.ModelArgs.from_dict(bad)
