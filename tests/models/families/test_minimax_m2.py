"""MiniMax-M2 (minimax_m2): tiny configs for the shared parity checks, and its own tests
(its router by hand, routing and structure against transformers with a non-zero
correction bias, rotary_dim resolution, sanitize names, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import minimax_m2

from models import parity
from models.families.test_glm4_moe import set_correction_bias
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # 8 experts top-2, GQA 2, head_dim 16 with rotary_dim 8, full-width q/k norms.
    "minimax_m2-rotary-dim": lambda: tf.MiniMaxM2Config(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rotary_dim=8, num_local_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    # 6 experts top-3, GQA 4, head_dim 24 (q width 96 > hidden 64), 3/4 of it rotated
    # (partial_rotary_factor in rope_parameters) under yarn, tied embeddings.
    "minimax_m2-factor-yarn-tied": lambda: tf.MiniMaxM2Config(
        **BASE, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "rope_theta": 1000000.0, "partial_rotary_factor": 0.75},
    ),
}

TINY = dict(model_type="minimax_m2", vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
            head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    set_correction_bias(hf, lambda layer: layer.mlp.e_score_correction_bias, out)
    model, _ = load_hf(out)
    return hf, model, out


def test_routing_by_hand():
    """Scores (0.5, 0.75, 0.25, 0.9) with bias (0.5, 0, 0, -0.5) are corrected to (1.0,
    0.75, 0.25, 0.4): experts 0 and 1 (the bias only chooses: without it, 3 and 1). The
    weights are their uncorrected scores renormalised: 0.5/1.25 = 0.4 and 0.75/1.25 = 0.6."""
    model = minimax_m2.build(minimax_m2.ModelArgs.from_dict(TINY))
    r = model.layers[0].mlp.router
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
        r.e_score_correction_bias.copy_(torch.tensor([0.5, 0.0, 0.0, -0.5]))
    weights, ids, logits = r(torch.tensor([[0.0, math.log(3), -math.log(3), math.log(9)]]))
    assert ids[0].tolist() == [0, 1]
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.6]]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers])
    parity.check_logits(hf, model)  # with the non-zero correction bias


def test_structure_matches_transformers(pair):
    """Every layer MoE without a shared expert; full-width q/k norms; the rotated width."""
    hf, model, _ = pair
    cfg = hf.config
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert ours.mlp.shared is None and ours.mlp.num_experts == cfg.num_local_experts
        assert ours.attn.spec.qk_norm == "full"
        assert ours.attn.q_norm.weight.shape == theirs.self_attn.q_norm.weight.shape
        assert ours.attn.k_norm.weight.shape == theirs.self_attn.k_norm.weight.shape
        assert ours.attn.q.bias is None and ours.attn.o.bias is None
        assert ours.attn.rope.dim == 2 * hf.model.rotary_emb.inv_freq.numel() < cfg.head_dim


def test_rotary_and_defaults():
    """rotary_dim gives the factor unless partial_rotary_factor is set (the rope block's
    first); absent head_dim is 128 and absent rope theta 5e6, as in transformers."""
    assert minimax_m2.ModelArgs.from_dict(TINY).rope_dim == 8
    assert minimax_m2.ModelArgs.from_dict(dict(TINY, rotary_dim=4)).rope_dim == 4
    assert minimax_m2.ModelArgs.from_dict(dict(TINY, rotary_dim=4, partial_rotary_factor=0.25)).rope_dim == 2
    block = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.75}
    args = minimax_m2.ModelArgs.from_dict(dict(TINY, rotary_dim=4, partial_rotary_factor=0.25, rope_parameters=block))
    assert (args.rope_dim, args.rope_theta) == (6, 100.0)
    args = minimax_m2.ModelArgs.from_dict({k: v for k, v in TINY.items() if k != "head_dim"})
    assert (args.head_dim, args.rope_theta) == (128, 5000000.0)


def test_sanitize_names():
    t = torch.zeros(2, 2)
    names = {n: minimax_m2.sanitize(n, t)[0][0] for n in [
        "model.layers.3.block_sparse_moe.gate.weight", "model.layers.3.block_sparse_moe.e_score_correction_bias",
        "model.layers.3.block_sparse_moe.experts.5.w1.weight", "model.layers.3.block_sparse_moe.experts.5.w3.weight",
        "model.layers.3.block_sparse_moe.experts.5.w2.weight", "model.layers.3.self_attn.q_norm.weight"]}
    assert list(names.values()) == [
        "layers.3.mlp.router.weight", "layers.3.mlp.router.e_score_correction_bias", "experts.3.5.gate",
        "experts.3.5.up", "experts.3.5.down", "layers.3.attn.q_norm.weight"]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    for key, value in [("scoring_func", "softmax"), ("use_routing_bias", False), ("use_qk_norm", False),
                       ("qk_norm_type", "per_head"), ("shared_intermediate_size", 64)]:
        with pytest.raises(ModelLoadError, match=f"config.json: {key} .* is not supported"):
            minimax_m2.ModelArgs.from_dict(dict(config, **{key: value}))
    layers = config["num_hidden_layers"]
    with pytest.raises(ModelLoadError, match="config.json: attn_type_list asks for linear attention"):
        minimax_m2.ModelArgs.from_dict(dict(config, attn_type_list=[0] + [1] * (layers - 1)))
    assert minimax_m2.ModelArgs.from_dict(dict(config, attn_type_list=[1] * layers, use_mtp=True))
    with pytest.raises(ModelLoadError, match="config.json: rotary_dim 40 exceeds head_dim"):
        minimax_m2.ModelArgs.from_dict({k: v for k, v in dict(config, rotary_dim=40).items()
                                        if k != "rope_parameters"})
