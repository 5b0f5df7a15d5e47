"""Cohere2-MoE (cohere2_moe): tiny configs for the shared parity checks, and its own tests
(top-k softmax and sigmoid routing by hand, routing and structure against transformers
with random norms and biases, the layer-type derivation, names, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import cohere2_moe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock
from edgemoe.models.norms import LayerNormNoBias, RMSNorm

from models import parity
from models.families.test_ernie4_5_moe import identity_router, perturb
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # Dense first layer (width 48, global with RoPE: prefix pattern 1), then MoE layers
    # sliding / global without RoPE / sliding (pattern 2, window 8); one shared expert
    # averaged with the routed sum; softmax routing; attention biases; LayerNorms; tied.
    "cohere2_moe-dense1-average-bias": lambda: tf.Cohere2MoeConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        prefix_dense_intermediate_size=48, num_shared_experts=1, sliding_window=8, sliding_window_pattern=2,
        attention_bias=True, logit_scale=0.5,
    ),
    # Two dense layers with their own window pattern 2 (sliding, then global without RoPE),
    # then two sliding MoE layers (window 6); sigmoid routing without renormalisation, top-3
    # of 6; two shared experts summed; RMSNorms; MQA with head_dim 24; linear rope; untied.
    "cohere2_moe-sigmoid-sum-rms": lambda: tf.Cohere2MoeConfig(
        **BASE, hidden_size=64, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, num_experts=6, num_experts_per_tok=3, first_k_dense_replace=2,
        prefix_dense_sliding_window_pattern=2, prefix_dense_intermediate_size=40, num_shared_experts=2,
        shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid", norm_topk_prob=False,
        rms_norm_eps=1e-5, sliding_window=6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}

TINY = dict(model_type="cohere2_moe", vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """transformers' model with random norm weights and biases, saved, and ours."""
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def test_routing_by_hand():
    """Logits (0, ln 3, -ln 3, ln 2), top two: experts 1 and 3.
    softmax over the two logits: 3/5 and 2/5;
    sigmoid: 3/4 and 2/3, or renormalised (norm_topk_prob) 9/17 and 8/17."""
    x = torch.tensor([[0.0, math.log(3), -math.log(3), math.log(2)]])
    for extra, want in (({}, [3 / 5, 2 / 5]),
                        ({"expert_selection_fn": "sigmoid", "norm_topk_prob": False}, [3 / 4, 2 / 3]),
                        ({"expert_selection_fn": "sigmoid"}, [9 / 17, 8 / 17])):
        r = identity_router(cohere2_moe, cohere2_moe.ModelArgs.from_dict(dict(TINY, **extra)))
        weights, ids, logits = r(x)
        torch.testing.assert_close(logits, x)
        assert ids.tolist() == [[1, 3]]
        torch.testing.assert_close(weights, torch.tensor([want]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")])
    parity.check_logits(hf, model)  # with random norms and attention biases


def test_structure_matches_transformers(pair):
    """Dense and MoE layers, windows, RoPE layers, norm kinds, shared-expert width and
    combination, logit scale and tying as transformers builds them."""
    hf, model, _ = pair
    cfg = hf.config
    assert model.args.layer_types == cfg.layer_types and model.args.mlp_layer_types == cfg.mlp_layer_types
    norm = RMSNorm if cfg.rms_norm_eps is not None else LayerNormNoBias
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        assert isinstance(ours, cohere2_moe.ParallelDecoderLayer) and isinstance(ours.norm1, norm)
        attn = theirs.self_attn
        assert ours.attn.spec.sliding_window == attn.sliding_window
        assert ours.attn.spec.use_rope == (attn.sliding_window is not None or attn.force_rope)
        assert (ours.attn.q.bias is not None) == (ours.attn.o.bias is not None) == cfg.attention_bias
        if hasattr(theirs.mlp, "gate"):
            assert isinstance(ours.mlp, MoEBlock) and ours.mlp.num_experts == cfg.num_experts
            average = cfg.shared_expert_combination_strategy == "average"
            assert isinstance(ours.mlp, cohere2_moe.AveragedMoEBlock) == average
            assert ours.mlp.shared.up.weight.shape == theirs.mlp.shared_experts.up_proj.weight.shape
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.up.weight.shape == theirs.mlp.up_proj.weight.shape
    assert model.args.moe_layers() == [i for i, t in enumerate(cfg.mlp_layer_types) if t == "sparse"]
    assert isinstance(model.norm, norm)
    assert model.logits_scale == cfg.logit_scale
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


@pytest.mark.parametrize("k, pre, rest", [(0, 1, 4), (2, 1, 3), (3, 2, 2), (1, 3, 1)])
def test_layer_types_derived_as_transformers(k, pre, rest):
    """A config without layer_types / mlp_layer_types (first_k_dense_replace and the two
    window patterns instead) gets the same ones transformers derives."""
    cfg = tf.Cohere2MoeConfig(num_hidden_layers=6, first_k_dense_replace=k, prefix_dense_sliding_window_pattern=pre,
                              sliding_window_pattern=rest)
    args = cohere2_moe.ModelArgs.from_dict(dict(TINY, num_hidden_layers=6, first_k_dense_replace=k,
                                                prefix_dense_sliding_window_pattern=pre, sliding_window_pattern=rest))
    assert args.layer_types == cfg.layer_types
    assert args.mlp_layer_types == cfg.mlp_layer_types


def test_checkpoint_names():
    w = torch.zeros(2, 2)
    names = {
        "model.layers.3.mlp.shared_experts.down_proj.weight": "layers.3.mlp.shared.down.weight",
        "model.layers.3.mlp.gate.weight": "layers.3.mlp.router.weight",
        "model.layers.3.mlp.experts.5.up_proj.weight": "experts.3.5.up",
        "model.layers.0.mlp.gate_proj.weight": "layers.0.mlp.gate.weight",
        "model.layers.1.input_layernorm.weight": "layers.1.norm1.weight",
    }
    for src, want in names.items():
        assert cohere2_moe.sanitize(src, w)[0][0] == want


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    L = config["num_hidden_layers"]
    cases = {
        "expert_selection_fn 'relu' is not supported": dict(expert_selection_fn="relu"),
        "shared_expert_combination_strategy 'max' is not supported": dict(shared_expert_combination_strategy="max"),
        "unsupported layer_types entries: chunked_attention": dict(layer_types=["chunked_attention"] * L),
        "unsupported mlp_layer_types entries: moe": dict(mlp_layer_types=["moe"] * L),
        f"mlp_layer_types has 1 entries for {L} layers": dict(mlp_layer_types=["sparse"]),
        "layer_types has sliding_attention layers but sliding_window is null": dict(sliding_window=None),
        "rope type 'dynamic' is not supported": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    }
    for message, change in cases.items():
        with pytest.raises(ModelLoadError, match=f"config.json: {message}"):
            cohere2_moe.ModelArgs.from_dict(dict(config, **change))
