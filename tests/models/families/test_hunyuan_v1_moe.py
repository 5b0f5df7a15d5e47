"""Hunyuan-MoE v1 (hunyuan_v1_moe): tiny configs for the shared parity checks, and its
own tests (NTK-alpha frequencies by hand, routing and structure against transformers,
per-layer lists, original-config keys, refusals)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import hunyuan_v1_moe
from edgemoe.models.moe import MoEBlock
from edgemoe.models.rope import rope_frequencies

from models import parity
from models.families.test_ernie4_5_moe import perturb
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # Per-layer moe_topk list (all 2), 6 experts, head_dim 24 (not 64/4), bias on q/k/v/o,
    # NTK-alpha rope ("dynamic" with alpha, as Hunyuan-A13B ships it), tied embeddings.
    "hunyuan_v1_moe-alpha-list-bias-tied": lambda: tf.HunYuanMoEV1Config(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, num_experts=6, moe_topk=[2, 2, 2], attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0},
    ),
    # Top-3 of 8, GQA 4, no biases, linear rope, untied.
    "hunyuan_v1_moe-top3-gqa4-linear": lambda: tf.HunYuanMoEV1Config(
        **BASE, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, num_experts=8, moe_topk=3, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}

TINY = dict(model_type="hunyuan_v1_moe", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=2, head_dim=4, num_experts=4, moe_topk=2)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def test_ntk_alpha_frequencies_by_hand():
    """head_dim 4, theta 1e4, alpha 1e3: the base becomes 1e4 * 1e3^(4/2) = 1e10, so the
    inverse frequencies are 1e10^0 = 1 and 1e10^(-2/4) = 1e-5; no cos/sin scale."""
    args = hunyuan_v1_moe.ModelArgs.from_dict(dict(
        TINY, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "beta_fast": 32, "mscale": 1.0}))
    assert args.rope_scaling == {"rope_type": "ntk_alpha", "alpha": 1000.0} and args.rope_theta == 10000.0
    inv, scale = rope_frequencies(4, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(inv, torch.tensor([1.0, 1e-5]), atol=0, rtol=1e-6)
    assert scale == 1.0


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers])
    parity.check_logits(hf, model)  # with random q/k norms (uniform ones commute with RoPE) and biases


def test_structure_matches_transformers(pair):
    """Every layer MoE with a shared MLP of the expert width, per-head q/k norms after
    RoPE, attention biases as configured, the rope table transformers uses."""
    hf, model, _ = pair
    cfg = hf.config
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert isinstance(ours.mlp, MoEBlock)
        assert ours.mlp.router.top_k == theirs.mlp.gate.top_k and ours.mlp.num_experts == theirs.mlp.gate.num_experts
        assert ours.mlp.shared.gate.out_features == theirs.mlp.shared_mlp.intermediate_size == cfg.intermediate_size
        assert ours.mlp.shared_gate is None
        assert ours.attn.spec.qk_norm == "head" and ours.attn.spec.qk_norm_after_rope
        assert ours.attn.q_norm.weight.shape == theirs.self_attn.query_layernorm.weight.shape
        assert (ours.attn.q.bias is not None) == (ours.attn.o.bias is not None) == cfg.attention_bias
    torch.testing.assert_close(model.layers[0].attn.rope.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)


def test_original_config_keys_accepted():
    """The keys Hunyuan-A13B's own config.json carries, at the values transformers runs."""
    n = TINY["num_hidden_layers"]
    args = hunyuan_v1_moe.ModelArgs.from_dict(dict(
        TINY, moe_topk=[2] * n, num_experts=4, moe_intermediate_size=[8] * n, num_shared_expert=[1] * n,
        use_qk_norm=True, use_cla=False, use_mla=False, mlp_bias=False, moe_layer_num_skipped=0, norm_topk_prob=True,
        use_rotary_pos_emb=True, attention_head_dim=4, cla_share_factor=2))
    assert (args.experts_per_layer, args.top_k, args.expert_dim) == (4, 2, 8)
    assert args.moe_layers() == [0, 1]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    n = config["num_hidden_layers"]
    with pytest.raises(ModelLoadError, match=r"config.json: moe_topk differs between layers \(\[2, 3"):
        hunyuan_v1_moe.ModelArgs.from_dict(dict(config, moe_topk=[2, 3] + [2] * (n - 2)))
    with pytest.raises(ModelLoadError, match="config.json: num_experts differs between layers"):
        hunyuan_v1_moe.ModelArgs.from_dict(dict(config, num_experts=[6] * (n - 1) + [4]))
    with pytest.raises(ModelLoadError, match=f"config.json: moe_topk has 1 entries for {n} layers"):
        hunyuan_v1_moe.ModelArgs.from_dict(dict(config, moe_topk=[2]))
    no_alpha = {k: v for k, v in config.items() if k != "rope_parameters"}
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' without an alpha"):
        hunyuan_v1_moe.ModelArgs.from_dict(dict(no_alpha, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ModelLoadError, match="config.json: rope alpha must be a number"):
        hunyuan_v1_moe.ModelArgs.from_dict(dict(no_alpha, rope_scaling={"type": "dynamic", "alpha": "big"}))
    refused = {"use_cla": True, "use_mla": True, "use_qk_norm": False, "mlp_bias": True, "moe_layer_num_skipped": 1,
               "norm_topk_prob": False, "use_rotary_pos_emb": False, "num_shared_expert": [1] * (n - 1) + [2],
               "moe_intermediate_size": config["intermediate_size"] * 2}
    for key, value in refused.items():
        with pytest.raises(ModelLoadError, match=f"config.json: {key} .* is not supported"):
            hunyuan_v1_moe.ModelArgs.from_dict(dict(config, **{key: value}))
