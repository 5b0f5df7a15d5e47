"""EXAONE-MoE: tiny configs for the shared parity checks, and its own tests (grouped
sigmoid routing by hand, routing with trained-looking router biases and the hybrid
NoPE/sliding structure against transformers, checkpoint names, refusals).

The helpers here (`pair_with_biased_routers`, `check_routing`) are shared with the AFMoE
and Sarvam-MoE tests: transformers initialises their correction biases to 0 (and AFMoE's
router weights too), which would leave the bias-for-choice path untested."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import exaone_moe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock
from edgemoe.models.routers import GroupedRouter

from models import parity

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # 4 layers: dense first layer, sliding (RoPE) / global (NoPE) alternating with a
    # window of 8, 8 experts in 4 groups of which 2 are kept, top-3 renormalised x 2.5,
    # one shared expert, GQA 2.
    "exaone_moe-hybrid-groups": lambda: tf.ExaoneMoeConfig(
        **BASE, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, first_k_dense_replace=1, num_shared_experts=1, routed_scaling_factor=2.5,
        sliding_window=8, sliding_window_pattern=2, tie_word_embeddings=False,
    ),
    # Explicit mlp_layer_types (sparse, dense, sparse) and layer_types (global, sliding,
    # global), 6 experts top-3 with raw weights, two shared experts' width, MHA, tied
    # embeddings, yarn rope.
    "exaone_moe-types-raw-yarn": lambda: tf.ExaoneMoeConfig(
        **BASE, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False, num_shared_experts=2, routed_scaling_factor=1.5, sliding_window=6,
        mlp_layer_types=["sparse", "dense", "sparse"],
        layer_types=["full_attention", "sliding_attention", "full_attention"], tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "rope_theta": 10000.0},
    ),
}


# ----------------------------------------------------------------------------- shared helpers


def pair_with_biased_routers(config, out: Path, router_params) -> tuple:
    """Save `config` with transformers, give every router random weights (std 0.1) and
    its correction bias random values in [-0.5, 0.2), save again and load it with
    edgemoe. `router_params(hf)` lists transformers' (router weight, correction bias) of
    every MoE layer.

    With groups (n_group > 1) every odd expert's bias is lowered by 1.5 more, so its
    corrected score is always negative: a config picking more experts than the kept
    groups' even ones then has to take a negative one from the kept groups, never an
    expert of a dropped group (transformers masks those with -inf, not 0)."""
    hf = parity.save(config, out)
    g = torch.Generator().manual_seed(7)
    grouped = getattr(config, "n_group", 1) > 1
    with torch.no_grad():
        for w, b in router_params(hf):
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
            b.copy_(torch.rand(b.shape, generator=g) * 0.7 - 0.5)
            if grouped:
                b[1::2] -= 1.5
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def check_routing(hf, model, routers: list[torch.nn.Module]) -> None:
    """Our router logits, chosen experts (as sets) and weights equal transformers' on
    every MoE layer, and some tokens pick an expert its uncorrected score would not."""
    theirs = parity.check_routing(hf, model, routers)
    bias_mattered = False
    for want_logits, _, want_ids in theirs:
        plain = want_logits.topk(want_ids.shape[1], dim=-1).indices.sort(dim=-1).values
        bias_mattered |= not torch.equal(plain, want_ids.sort(dim=-1).values)
    assert bias_mattered


# ----------------------------------------------------------------------------- tests


def hf_routers(hf):
    return [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "experts")]


def hf_router_params(hf):
    return [(r.weight, r.e_score_correction_bias) for r in hf_routers(hf)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return pair_with_biased_routers(CONFIGS[request.param](), out, hf_router_params)


def test_grouped_routing_by_hand():
    """Scores sigmoid(logits) = (0.8, 0.5, 0.5, 0.5), biases (0.1, -0.6, -0.2, -0.2): the
    corrected scores (0.9, -0.1, 0.3, 0.3) make group {0, 1} (sum 0.8) beat {2, 3} (0.6),
    so with one group kept experts 0 and 1 are chosen, although expert 1's corrected
    score is negative (the other group's experts are never chosen). The weights are the
    uncorrected scores renormalised, times 2.5: 2.5 * 0.8/1.3 and 2.5 * 0.5/1.3."""
    args = exaone_moe.ModelArgs.from_dict(dict(
        model_type="exaone_moe", vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=8, moe_intermediate_size=4, num_experts=4, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, sliding_window=4))
    router = exaone_moe.build(args).layers[1].mlp.router
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[math.log(4.0)] + [0.0] * 7] + [[0.0] * 8] * 3))
        router.e_score_correction_bias.copy_(torch.tensor([0.1, -0.6, -0.2, -0.2]))
    x = torch.ones(1, 8)
    weights, ids, _ = router(x)
    ids, order = ids.sort(dim=-1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights.gather(1, order), torch.tensor([[2.5 * 0.8 / 1.3, 2.5 * 0.5 / 1.3]]))
    # DeepSeek-V2's rule (masked experts score 0) would take expert 2 or 3 instead.
    v2 = GroupedRouter(8, 4, 2, True, correction=True, n_group=2, topk_group=1)
    v2.load_state_dict(router.state_dict())
    assert v2(x)[1].sort(dim=-1).values.tolist() in ([[0, 2]], [[0, 3]])


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, hf_routers(hf))


def test_logits_match_transformers_with_biased_routers(pair):
    hf, model, _ = pair
    parity.check_logits(hf, model)


def test_structure_matches_transformers(pair):
    """MoE/dense layers, shared expert width, sliding windows and NoPE global layers as
    transformers builds them."""
    hf, model, _ = pair
    cfg = hf.config
    moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert model.args.moe_layers() == moe
    assert moe and len(moe) < cfg.num_hidden_layers
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        sliding = theirs.self_attn.is_sliding
        assert ours.attn.spec.sliding_window == (cfg.sliding_window if sliding else None)
        assert ours.attn.spec.use_rope == sliding
        assert ours.attn.spec.qk_norm == "head"
        if i in moe:
            assert isinstance(ours.mlp, MoEBlock)
            assert ours.mlp.shared.gate.weight.shape == theirs.mlp.shared_experts.gate_proj.weight.shape
            r = ours.mlp.router
            assert (r.n_group, r.topk_group, r.scaling) == (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor)
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.gate.weight.shape == theirs.mlp.gate_proj.weight.shape
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_checkpoint_names():
    """The bias is read from the MoE block (on disk) or the gate (transformers' in-memory
    name); multi-token-prediction weights are skipped."""
    t = torch.zeros(4)
    for name in ("model.layers.3.mlp.e_score_correction_bias", "model.layers.3.mlp.gate.e_score_correction_bias"):
        assert exaone_moe.sanitize(name, t)[0][0] == "layers.3.mlp.router.e_score_correction_bias"
    assert exaone_moe.sanitize("mtp.layers.0.mlp.gate.weight", t) == []
    assert exaone_moe.sanitize("model.layers.2.mlp.shared_experts.down_proj.weight", t)[0][0] == (
        "layers.2.mlp.shared.down.weight")
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        exaone_moe.sanitize("model.layers.2.mlp.shared_experts.proj.weight", t)


def test_defaults_match_transformers():
    """A config.json that leaves everything optional out gets transformers' defaults."""
    given = dict(vocab_size=384, hidden_size=256, num_hidden_layers=6, num_attention_heads=32)
    args = exaone_moe.ModelArgs.from_dict(dict(given, model_type="exaone_moe"))
    cfg = tf.ExaoneMoeConfig(**given)
    fields = (
        "num_key_value_heads", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
        "num_shared_experts", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "sliding_window",
        "layer_types", "mlp_layer_types", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    )
    for field in fields:
        assert getattr(args, field) == getattr(cfg, field), field
    assert args.head_dim == getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    assert args.rope_theta == cfg.rope_parameters["rope_theta"] and args.rope_scaling is None
    assert args.moe_layers() == [i for i, t in enumerate(cfg.mlp_layer_types) if t == "sparse"]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    no_types = {k: v for k, v in config.items() if k != "layer_types"}
    cases = [
        (dict(no_types, sliding_window_pattern="LLG"), "sliding_window_pattern 'LLG' is not supported"),
        (dict(no_types, sliding_window_pattern=0), "sliding_window_pattern 0 is not supported"),
        (dict(config, layer_types=["chunked_attention"] * config["num_hidden_layers"]),
         "unsupported layer_types entries: chunked_attention"),
        (dict(config, mlp_layer_types=["moe"] * config["num_hidden_layers"]), "unsupported mlp_layer_types entries"),
        (dict(config, mlp_layer_types=["sparse"]), "mlp_layer_types has 1 entries"),
        (dict(config, sliding_window=None), "sliding_window must be an integer"),
        (dict(config, n_group=5), "n_group 5 does not divide"),
        (dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    ]
    for bad, message in cases:
        with pytest.raises(ModelLoadError, match="config.json: " + message):
            exaone_moe.ModelArgs.from_dict(bad)
