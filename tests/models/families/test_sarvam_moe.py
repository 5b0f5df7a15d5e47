"""Sarvam-MoE: tiny configs for the shared parity checks, and its own tests (routing with
trained-looking router biases and the layer structure against transformers, which runs
it with the GLM-4.5 code; the fused query_key_value layout; rope defaults; refusals)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.errors import ModelLoadError
from edgemoe.models import sarvam_moe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock

from models import parity
from models.families.test_exaone_moe import check_routing, pair_with_biased_routers

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # 3 layers, the first dense; 8 experts in 4 groups of which 2 are kept, top-3
    # renormalised x 2.5, one shared expert; q/k norms, a qkv bias, RoPE on half of each
    # head (partial_rotary_factor 0.5), GQA 2, rope theta left at the family's 8e6.
    "sarvam_moe-groups-bias-partial": lambda: tf.SarvamMoEConfig(
        **BASE, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, attention_bias=True,
        use_qk_norm=True, partial_rotary_factor=0.5, tie_word_embeddings=False,
    ),
    # Every layer MoE, 6 experts top-2 with raw weights x 1.0, two shared experts' width,
    # no q/k norm, GQA 4 with head_dim 12, tied embeddings, llama3 rope.
    "sarvam_moe-noqknorm-raw-tied": lambda: tf.SarvamMoEConfig(
        **BASE, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
        first_k_dense_replace=0, n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.0,
        use_qk_norm=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ),
}


def hf_routers(hf):
    return [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "experts")]


def hf_router_params(hf):
    return [(r.weight, r.e_score_correction_bias) for r in hf_routers(hf)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return pair_with_biased_routers(CONFIGS[request.param](), out, hf_router_params)


def test_grouped_routing_by_hand():
    """The EXAONE-MoE hand example (same router): sigmoid scores (0.8, 0.5, 0.5, 0.5),
    biases (0.1, -0.6, -0.2, -0.2), two groups of which one is kept: experts 0 and 1, with
    weights 2.5 * 0.8/1.3 and 2.5 * 0.5/1.3, although expert 1's corrected score is
    negative."""
    args = sarvam_moe.ModelArgs.from_dict(dict(
        model_type="sarvam_moe", vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, intermediate_size=8, moe_intermediate_size=4, num_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1))
    router = sarvam_moe.build(args).layers[1].mlp.router
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.3862943611198906  # log 4: sigmoid 0.8
        router.e_score_correction_bias.copy_(torch.tensor([0.1, -0.6, -0.2, -0.2]))
    weights, ids, _ = router(torch.ones(1, 8))
    ids, order = ids.sort(dim=-1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights.gather(1, order), torch.tensor([[2.5 * 0.8 / 1.3, 2.5 * 0.5 / 1.3]]))


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, hf_routers(hf))


def test_logits_match_transformers_with_biased_routers(pair):
    hf, model, _ = pair
    parity.check_logits(hf, model)


def test_structure_matches_transformers(pair):
    """Dense/MoE layers, shared width, q/k norms, biases and the rotated width as
    transformers builds them."""
    hf, model, _ = pair
    cfg = hf.config
    moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert model.args.moe_layers() == moe
    head_dim = cfg.head_dim
    assert model.layers[0].attn.rope.dim == hf.model.rotary_emb.inv_freq.numel() * 2
    torch.testing.assert_close(model.layers[0].attn.rope.inv_freq, hf.model.rotary_emb.inv_freq)
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        a, t = ours.attn, theirs.self_attn
        assert a.qkv.weight.shape[0] == t.q_proj.weight.shape[0] + t.k_proj.weight.shape[0] + t.v_proj.weight.shape[0]
        assert (a.qkv.bias is not None) == (t.q_proj.bias is not None) == cfg.attention_bias
        assert a.o.bias is None and t.o_proj.bias is None
        assert hasattr(a, "q_norm") == hasattr(t, "q_norm") == cfg.use_qk_norm
        assert a.spec.head_dim == head_dim
        if i in moe:
            assert isinstance(ours.mlp, MoEBlock)
            assert ours.mlp.shared.gate.weight.shape == theirs.mlp.shared_experts.gate_proj.weight.shape
            r = ours.mlp.router
            assert (r.n_group, r.topk_group, r.scaling) == (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor)
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.gate.weight.shape == theirs.mlp.gate_proj.weight.shape


def test_checkpoint_names():
    """The original (Bailing-style) names transformers reads and writes."""
    t = torch.zeros(4)
    names = {
        "model.word_embeddings.weight": "embed.weight",
        "model.layers.2.attention.query_key_value.weight": "layers.2.attn.qkv.weight",
        "model.layers.2.attention.query_key_value.bias": "layers.2.attn.qkv.bias",
        "model.layers.2.attention.dense.weight": "layers.2.attn.o.weight",
        "model.layers.2.attention.query_layernorm.weight": "layers.2.attn.q_norm.weight",
        "model.layers.2.attention.key_layernorm.weight": "layers.2.attn.k_norm.weight",
        "model.layers.2.mlp.gate.expert_bias": "layers.2.mlp.router.e_score_correction_bias",
        "model.layers.2.mlp.gate.e_score_correction_bias": "layers.2.mlp.router.e_score_correction_bias",
        "model.layers.2.mlp.shared_experts.gate_proj.weight": "layers.2.mlp.shared.gate.weight",
    }
    for name, want in names.items():
        assert sarvam_moe.sanitize(name, t) == [(want, t)]


def test_config_names_and_rope_defaults(pair):
    """The original config's names (num_experts, num_shared_experts, use_qkv_bias) are
    read; rope theta defaults to 8e6 and partial_rotary_factor to 1, a top-level factor
    counts unless rope_parameters has one."""
    _, model, out = pair
    config = json.loads((out / "config.json").read_text())
    plain = {k: v for k, v in config.items() if k not in ("rope_parameters", "n_routed_experts", "n_shared_experts",
                                                          "attention_bias")}
    args = sarvam_moe.ModelArgs.from_dict(dict(plain, num_experts=8, num_shared_experts=3, use_qkv_bias=True))
    assert (args.n_routed_experts, args.n_shared_experts, args.attention_bias) == (8, 3, True)
    assert (args.rope_theta, args.rope_scaling, args.partial_rotary_factor) == (8e6, None, 1.0)
    args = sarvam_moe.ModelArgs.from_dict(dict(plain, partial_rotary_factor=0.5))
    assert args.partial_rotary_factor == 0.5
    args = sarvam_moe.ModelArgs.from_dict(dict(plain, partial_rotary_factor=0.25,
                                               rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}))
    assert args.partial_rotary_factor == 0.5 and args.rope_theta == 8e6


def test_defaults_match_transformers():
    """A config.json that leaves everything optional out gets transformers' Sarvam defaults."""
    given = dict(vocab_size=384, hidden_size=256, num_hidden_layers=2, num_attention_heads=8)
    args = sarvam_moe.ModelArgs.from_dict(dict(given, model_type="sarvam_moe"))
    cfg = tf.SarvamMoEConfig(**given)
    for field in ("num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                  "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group",
                  "first_k_dense_replace", "norm_topk_prob", "use_qk_norm", "attention_bias", "rms_norm_eps",
                  "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(args, field) == getattr(cfg, field), field
    assert args.rope_theta == cfg.rope_parameters["rope_theta"]
    assert args.partial_rotary_factor == cfg.rope_parameters["partial_rotary_factor"]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    cases = [
        (dict(config, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.1}),
         "partial_rotary_factor 0.1 of head_dim .* rotates 1 channels"),
        (dict(config, rope_parameters={"rope_type": "default", "partial_rotary_factor": "half"}),
         "partial_rotary_factor must be a number"),
        (dict(config, scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
        (dict(config, n_group=5), "n_group 5 does not divide"),
        (dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    ]
    for bad, message in cases:
        with pytest.raises(ModelLoadError, match="config.json: " + message):
            sarvam_moe.ModelArgs.from_dict(bad)
    # Only the fused layout Sarvam checkpoints (and transformers' save_pretrained) hold.
    with pytest.raises(ModelLoadError, match="'model.layers.0.self_attn.k_proj.weight': separate q/k/v"):
        sarvam_moe.sanitize("model.layers.0.self_attn.k_proj.weight", torch.zeros(2))
