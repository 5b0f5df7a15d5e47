"""GLM-4.7-Flash (glm4_moe_lite): tiny configs for the shared parity checks, and its own
tests (routing and structure against transformers with a non-zero correction bias,
mlp_layer_types, both MLA paths, refusals). Its router is DeepSeek-V3's, checked by hand
in test_deepseek_v3."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.models import glm4_moe_lite

from models import parity
from models.families.test_deepseek_v2 import (
    MLA, check_both_paths, check_mla_refusals, check_refused, check_routing, check_structure, fixture_pair,
)
from models.families.test_deepseek_v3 import randomize_correction_bias

CONFIGS = {
    # GLM-4.7-Flash's shape: q LoRA, interleaved RoPE, default layer kinds (layer 0 dense),
    # 6 experts top-2 renormalised and scaled by 1.8, one shared expert, norm eps 1e-5.
    "glm4_moe_lite-default-layers": lambda: tf.Glm4MoeLiteConfig(
        **MLA, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=6, num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    # Explicit mlp_layer_types (dense in the middle), 8 experts in 2 groups of 4 with one
    # kept, top-3 raw weights, two shared experts, no q LoRA, half-layout RoPE with theta
    # 1e6, attention bias, tied embeddings.
    "glm4_moe_lite-layer-types-groups": lambda: tf.Glm4MoeLiteConfig(
        **MLA, num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"], q_lora_rank=None,
        n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.3, n_shared_experts=2, rope_interleave=False, attention_bias=True,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
}

pair = fixture_pair(CONFIGS)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def biased(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param + "-bias")
    hf = parity.save(CONFIGS[request.param](), out)
    randomize_correction_bias(hf, out)
    model, _ = load_hf(out)
    return hf, model


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model)


def test_routing_with_correction_bias_matches_transformers(biased):
    hf, model = biased
    check_routing(hf, model)
    parity.check_logits(hf, model)


def test_structure_matches_transformers(pair):
    hf, model, _ = pair
    check_structure(hf, model)
    assert model.args.moe_layers() == [i for i, k in enumerate(hf.config.mlp_layer_types) if k == "sparse"]


def test_both_attention_paths_match_transformers(pair):
    hf, model, _ = pair
    check_both_paths(hf, model)


def test_layer_kinds_without_mlp_layer_types(pair):
    """Hub configs name first_k_dense_replace instead: its first layers are dense."""
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    config.pop("mlp_layer_types")
    assert glm4_moe_lite.ModelArgs.from_dict(config).moe_layers() == [1, 2]
    assert glm4_moe_lite.ModelArgs.from_dict(dict(config, first_k_dense_replace=2)).moe_layers() == [2]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    check_mla_refusals(config, glm4_moe_lite)
    check_refused(dict(config, mlp_layer_types=["dense", "moe", "sparse"]), glm4_moe_lite,
                  "unsupported mlp_layer_types entries: moe")
    check_refused(dict(config, mlp_layer_types=["dense", "sparse"]), glm4_moe_lite,
                  "mlp_layer_types has 2 entries for 3 layers")
    check_refused(dict(config, moe_layer_freq=2), glm4_moe_lite, "moe_layer_freq 2 is not supported")
    check_refused(dict(config, topk_method="group_limited_greedy"), glm4_moe_lite,
                  "topk_method 'group_limited_greedy' is not supported by glm4_moe_lite")


def test_mtp_layer_is_skipped():
    """GLM-4.7-Flash's multi-token-prediction layer follows its 47 decoder layers."""
    from types import SimpleNamespace

    from edgemoe.models import sanitizer

    t = torch.zeros(2, 2)
    sanitize = sanitizer(glm4_moe_lite, SimpleNamespace(num_hidden_layers=47))
    assert sanitize("model.layers.47.shared_head.head.weight", t) == []
    assert sanitize("model.layers.46.self_attn.q_a_layernorm.weight", t) == [
        ("layers.46.attn.q_a_norm.weight", t)]
