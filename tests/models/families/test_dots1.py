"""dots.llm1 (dots1): tiny configs for the shared parity checks, and its own tests (its
router settings by hand, routing and structure against transformers with a non-zero
correction bias, the sliding-window rule, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import dots1
from edgemoe.models.moe import MoEBlock

from models import parity
from models.families.test_glm4_moe import gate_bias, identity_router, set_correction_bias
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)
WINDOW = 6  # shorter than parity.SEQ

CONFIGS = {
    # Every layer MoE (first_k_dense_replace 0), one group, raw weights (dots1's default),
    # one shared expert, layers 1-2 slide by max_window_layers, bias on all four attention
    # projections, GQA 2.
    "dots1-window-bias": lambda: tf.Dots1Config(
        **BASE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=6, n_shared_experts=1,
        num_experts_per_tok=2, sliding_window=WINDOW, max_window_layers=1, attention_bias=True,
        tie_word_embeddings=False,
    ),
    # Dense layer 0, 8 experts in 2 groups (one kept), top-3 renormalised and scaled by 2,
    # two shared experts, explicit layer_types (layer 1 full), GQA 4, linear rope.
    "dots1-groups-dense-linear": lambda: tf.Dots1Config(
        **BASE, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0,
        first_k_dense_replace=1, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}

TINY = dict(model_type="dots1", vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, head_dim=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=None, topk_group=None)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    set_correction_bias(hf, gate_bias, out)
    model, _ = load_hf(out)
    return hf, model, out


def test_default_routing_by_hand():
    """dots1's defaults: null groups (one group), raw weights, no scaling. Scores (0.5,
    0.75, 0.25, 0.9) with bias (0.5, 0, 0, -0.5) are corrected to (1.0, 0.75, 0.25, 0.4):
    experts 0 and 1, with their uncorrected scores 0.5 and 0.75 as weights."""
    args = dots1.ModelArgs.from_dict(TINY)
    assert (args.n_group, args.topk_group) == (1, 1)
    r = identity_router(args)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0.5, 0.0, 0.0, -0.5]))
    weights, ids, _ = r(torch.tensor([[0.0, math.log(3), -math.log(3), math.log(9)]]))
    assert ids[0].tolist() == [0, 1]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.75]]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")])
    parity.check_logits(hf, model)  # with the non-zero correction bias


def test_structure_matches_transformers(pair):
    """MoE layers, shared width, windows per layer, q/k norms, biases and full rotary."""
    hf, model, _ = pair
    cfg = hf.config
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        assert isinstance(ours.mlp, MoEBlock) == (i >= cfg.first_k_dense_replace)
        assert isinstance(ours.mlp, MoEBlock) == hasattr(theirs.mlp, "gate")
        if isinstance(ours.mlp, MoEBlock):
            assert ours.mlp.shared.gate.out_features == theirs.mlp.shared_experts.intermediate_size
        assert ours.attn.spec.sliding_window == theirs.self_attn.sliding_window
        assert ours.attn.spec.qk_norm == "head"
        assert (ours.attn.o.bias is not None) == (ours.attn.q.bias is not None) == cfg.attention_bias
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        assert ours.attn.rope.dim == 2 * hf.model.rotary_emb.inv_freq.numel() == head_dim
    assert any(layer.attn.spec.sliding_window for layer in model.layers)


def test_window_rule_without_layer_types():
    """transformers' rule: layers from max_window_layers on slide when a window is set."""
    args = dots1.ModelArgs.from_dict(dict(TINY, num_hidden_layers=4, sliding_window=16, max_window_layers=2))
    assert [args.window(i) for i in range(4)] == [None, None, 16, 16]
    args = dots1.ModelArgs.from_dict(dict(TINY, num_hidden_layers=4, sliding_window=None, max_window_layers=0))
    assert [args.window(i) for i in range(4)] == [None] * 4


def test_partial_rotary_only_with_scaled_rope():
    """Default RoPE rotates the whole head in transformers' dots1; scaled kinds honour
    partial_rotary_factor."""
    rope = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert dots1.ModelArgs.from_dict(dict(TINY, rope_parameters=dict(rope, rope_type="default"))).rope_dim == 4
    linear = dict(rope, rope_type="linear", factor=2.0)
    assert dots1.ModelArgs.from_dict(dict(TINY, rope_parameters=linear)).rope_dim == 2


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    n = config["num_hidden_layers"]
    with pytest.raises(ModelLoadError, match="config.json: unsupported layer_types entries: chunked_attention"):
        dots1.ModelArgs.from_dict(dict(config, layer_types=["chunked_attention"] * n))
    with pytest.raises(ModelLoadError, match="config.json: layer_types has sliding_attention layers but"):
        dots1.ModelArgs.from_dict(dict(config, sliding_window=None, layer_types=["sliding_attention"] * n))
    with pytest.raises(ModelLoadError, match="config.json: layer_types has 1 entries for"):
        dots1.ModelArgs.from_dict(dict(config, layer_types=["full_attention"]))
    missing = {k: v for k, v in config.items() if k != "n_routed_experts"}
    with pytest.raises(ModelLoadError, match="config.json: n_routed_experts is required"):
        dots1.ModelArgs.from_dict(missing)
    with pytest.raises(ModelLoadError, match="config.json: scoring_func 'softmax' is not supported"):
        dots1.ModelArgs.from_dict(dict(config, scoring_func="softmax"))
