"""DeepSeek-V3: tiny configs for the shared parity checks, and its own tests (the
sigmoid/correction-bias/grouped router by hand, routing and structure against
transformers with a non-zero correction bias, both MLA paths, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.models import deepseek_v3

from models import parity
from models.families.test_deepseek_v2 import (
    MLA, YARN, check_both_paths, check_mla_refusals, check_refused, check_routing, check_structure, fixture_pair,
    identity_router,
)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

CONFIGS = {
    # V3's shape: q LoRA, interleaved RoPE, 8 experts in 4 groups scored by their best two,
    # 2 groups kept, top-3 renormalised and scaled by 2.5, one shared expert, dense layer 0,
    # norm eps 1e-5 (the latent norms keep 1e-6).
    "deepseek_v3-grouped-interleaved": lambda: tf.DeepseekV3Config(
        **MLA, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Moonlight's shape: no q LoRA, one group, raw (not renormalised) weights; half-layout
    # RoPE (rope_interleave false) under YaRN with mscale_all_dim, attention bias, no shared
    # expert, every layer MoE, tied embeddings.
    "deepseek_v3-moonlight-half-rope": lambda: tf.DeepseekV3Config(
        **MLA, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=5, num_experts_per_tok=2, n_group=1,
        topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.7, n_shared_experts=0, first_k_dense_replace=0,
        rope_interleave=False, attention_bias=True, tie_word_embeddings=True, rope_parameters=YARN,
    ),
}

pair = fixture_pair(CONFIGS)


def randomize_correction_bias(hf, out, seed: int = 7) -> None:
    """A random e_score_correction_bias below -1 on every MoE layer, saved again: every
    corrected score is negative, so experts outside the kept groups must lose to all
    inside (masked as -inf, not 0), and the bias reorders the choice."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "experts"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(-1.0 - 0.3 * torch.rand(bias.shape, generator=g))
    hf.save_pretrained(out)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def biased(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param + "-bias")
    hf = parity.save(CONFIGS[request.param](), out)
    randomize_correction_bias(hf, out)
    model, _ = load_hf(out)
    return hf, model


def v3_args(**extra) -> deepseek_v3.ModelArgs:
    config = dict(model_type="deepseek_v3", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                  n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=4, qk_rope_head_dim=2,
                  first_k_dense_replace=0)
    return deepseek_v3.ModelArgs.from_dict(dict(config, **extra))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_grouped_sigmoid_routing_by_hand():
    """8 experts in 4 groups of 2, the 2 groups with the best sum of two corrected scores
    kept, top-3, renormalised, times 2.5.

    logits 0 everywhere but expert 7 (logit 4): scores s = 0.5, s_7 = sigmoid(4) = 0.98201.
    bias (-1, -1, -1.2, -1.3, -0.9, -1.7, -2, -2): corrected -0.5, -0.5, -0.7, -0.8, -0.4,
    -1.2, -1.5, -1.01799. Group sums: -1, -1.5, -1.6, -2.51799: groups 0 and 1 are kept,
    every kept score is negative, and the top-3 of the kept ones is 0, 1, 2 (with 0.0 for
    the masked experts instead of -inf, experts 4-7 would win). Weights: the plain scores
    0.5 each, renormalised to 1/3, times 2.5."""
    r = identity_router(deepseek_v3.router(v3_args(n_group=4, topk_group=2, routed_scaling_factor=2.5)))
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([-1, -1, -1.2, -1.3, -0.9, -1.7, -2, -2]))
    x = torch.tensor([[0.0] * 7 + [4.0]])
    weights, ids, logits = r(x)
    assert torch.equal(logits, x)
    assert sorted(ids[0].tolist()) == [0, 1, 2]
    assert weights[0].tolist() == pytest.approx([2.5 / 3] * 3, abs=1e-6)
    # Without the bias, expert 7 (0.98201) joins two of the 0.5s: weights 2.5 * s / (s_7 + 1).
    with torch.no_grad():
        r.e_score_correction_bias.zero_()
    weights, ids, _ = r(x)
    assert 7 in ids[0].tolist()
    s7 = sigmoid(4)
    got = dict(zip(ids[0].tolist(), weights[0].tolist()))
    assert got[7] == pytest.approx(2.5 * s7 / (s7 + 1.0), abs=1e-6)
    assert sorted(w for e, w in got.items() if e != 7) == pytest.approx([2.5 * 0.5 / (s7 + 1.0)] * 2, abs=1e-6)


def test_raw_sigmoid_weights_by_hand():
    """norm_topk_prob false: the chosen experts' sigmoid scores times the scaling factor."""
    r = identity_router(deepseek_v3.router(v3_args(n_group=1, topk_group=1, norm_topk_prob=False,
                                                   routed_scaling_factor=2.0, num_experts_per_tok=2)))
    weights, ids, _ = r(torch.tensor([[1.0, -1.0, 3.0, 0.0, -2.0, 0.5, -3.0, 0.0]]))
    assert sorted(ids[0].tolist()) == [0, 2]
    got = dict(zip(ids[0].tolist(), weights[0].tolist()))
    assert got == pytest.approx({2: 2 * sigmoid(3), 0: 2 * sigmoid(1)}, abs=1e-6)


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
    for block in model.moe_blocks():
        r = block.router
        assert r.scoring == "sigmoid" and r.e_score_correction_bias is not None
        assert r.masked_score == float("-inf") and r.scaling == hf.config.routed_scaling_factor


def test_both_attention_paths_match_transformers(pair):
    hf, model, _ = pair
    check_both_paths(hf, model)


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    check_mla_refusals(config, deepseek_v3)
    check_refused(dict(config, topk_method="greedy"), deepseek_v3, "topk_method 'greedy' is not supported")
    check_refused(dict(config, scoring_func="softmax"), deepseek_v3, "scoring_func 'softmax' is not supported")
    check_refused(dict(config, n_group=None), deepseek_v3, "n_group must be an integer")
    # DeepSeek's own spelling of the only router kind is accepted.
    deepseek_v3.ModelArgs.from_dict(dict(config, topk_method="noaux_tc", scoring_func="sigmoid"))


def test_mtp_layer_is_skipped():
    """V3/R1 store their multi-token-prediction layer after the 61 decoder layers: every
    layer past num_hidden_layers is skipped, as transformers does."""
    from types import SimpleNamespace

    from edgemoe.models import sanitizer

    t = torch.zeros(2, 2)
    sanitize = sanitizer(deepseek_v3, SimpleNamespace(num_hidden_layers=61))
    assert sanitize("model.layers.61.eh_proj.weight", t) == []
    assert sanitize("model.layers.61.self_attn.kv_b_proj.weight", t) == []
    assert sanitize("model.layers.60.self_attn.kv_b_proj.weight", t) == [("layers.60.attn.kv_b.weight", t)]
    assert sanitize("model.layers.6.mlp.gate.e_score_correction_bias", t) == [
        ("layers.6.mlp.router.e_score_correction_bias", t)]
    # A 4-layer config: layer 4 is past the end, layer 3 is not.
    small = sanitizer(deepseek_v3, SimpleNamespace(num_hidden_layers=4))
    assert small("model.layers.4.self_attn.kv_b_proj.weight", t) == []
    assert small("model.layers.3.self_attn.kv_b_proj.weight", t) == [("layers.3.attn.kv_b.weight", t)]
