"""FlexOlmo: tiny configs for the shared parity checks, and its own tests (routing and
the post-norm block structure against transformers, the default rope theta, refusals)."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import flex_olmo
from edgemoe.models.base import PostNormDecoderLayer
from edgemoe.models.moe import MoEBlock

from models import parity
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=512)

CONFIGS = {
    # GQA 2, 4 experts top-2 with raw softmax weights, default rope (theta 5e5).
    "flex_olmo-gqa-raw": lambda: tf.FlexOlmoConfig(
        **BASE, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    # GQA 4, hidden 80 (head_dim 20), 6 experts top-3 renormalised, attention bias, tied
    # embeddings, yarn rope.
    "flex_olmo-bias-norm-yarn": lambda: tf.FlexOlmoConfig(
        **BASE, hidden_size=80, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "rope_theta": 500000.0},
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers])


def test_structure_matches_transformers(pair):
    """Every layer is a post-norm MoE block (no input norm in transformers either), with
    full-width q/k norms."""
    hf, model, _ = pair
    cfg = hf.config
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert isinstance(ours, PostNormDecoderLayer) and isinstance(ours.mlp, MoEBlock)
        assert not hasattr(theirs, "input_layernorm")
        assert ours.attn.q_norm.weight.shape == theirs.self_attn.q_norm.weight.shape
        assert ours.attn.k_norm.weight.shape == theirs.self_attn.k_norm.weight.shape
        assert (ours.attn.o.bias is not None) == cfg.attention_bias


def test_rope_theta_defaults_to_flexolmo_value():
    """A config naming no rope theta gets FlexOlmo's 500000, not the generic 10000."""
    cfg = dict(BASE, model_type="flex_olmo", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_experts=4, num_experts_per_tok=2)
    assert flex_olmo.ModelArgs.from_dict(cfg).rope_theta == 500000.0
    assert flex_olmo.ModelArgs.from_dict(dict(cfg, rope_theta=1e4)).rope_theta == 1e4
    assert flex_olmo.ModelArgs.from_dict(dict(cfg, rope_parameters={"rope_theta": 2e4})).rope_theta == 2e4


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        flex_olmo.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ModelLoadError, match=r"config.json: num_experts_per_tok \(5\) must be between 1"):
        flex_olmo.ModelArgs.from_dict(dict(config, num_experts_per_tok=5, num_experts=4))
    with pytest.raises(ModelLoadError, match="config.json: clip_qkv is not supported for FlexOlmo"):
        flex_olmo.ModelArgs.from_dict(dict(config, clip_qkv=8.0))
