"""Granite MoE: tiny configs for the shared parity checks, and its own tests (routing by
hand, routing and structure against transformers, fused-expert sanitize, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import granitemoe
from edgemoe.models.moe import MoEBlock
from edgemoe.models.routers import Router

from models import parity
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # GQA 2, 4 experts top-2, every multiplier away from 1, attention bias on all four
    # projections, untied head.
    "granitemoe-multipliers-bias": lambda: tf.GraniteMoeConfig(
        **BASE, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
        embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.4, logits_scaling=3.0,
        tie_word_embeddings=False,
    ),
    # MHA, hidden 60 (head_dim 20), 5 experts top-3, tied embeddings, linear rope scaling.
    "granitemoe-tied-linear": lambda: tf.GraniteMoeConfig(
        **BASE, hidden_size=60, intermediate_size=36, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=3, num_local_experts=5, num_experts_per_tok=3, embedding_multiplier=12.0,
        attention_multiplier=0.125, residual_multiplier=0.22, logits_scaling=8.0, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


def test_topk_then_softmax_by_hand():
    """Granite takes the top k logits and a softmax over them: logits (2, 1, 0, -1) with
    k=2 give experts 0 and 1 with weights e/(e+1) and 1/(e+1)."""
    r = Router(2, 4, 2, norm_topk=True)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]))
    weights, ids, logits = r(torch.tensor([[1.0, 5.0]]))
    assert ids.tolist() == [[0, 1]]
    assert logits.tolist() == [[2.0, 1.0, 0.0, -1.0]]
    e = math.e
    torch.testing.assert_close(weights, torch.tensor([[e / (e + 1), 1 / (e + 1)]]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.block_sparse_moe.router for layer in hf.model.layers])


def test_structure_matches_transformers(pair):
    """Every layer is MoE in both; the multipliers land where transformers applies them."""
    hf, model, _ = pair
    cfg = hf.config
    assert all(isinstance(layer.mlp, MoEBlock) and layer.mlp.shared is None for layer in model.layers)
    assert len(model.layers) == len(hf.model.layers)
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    assert model.embed_scale == cfg.embedding_multiplier
    assert model.logits_scale == pytest.approx(1 / cfg.logits_scaling)
    for ours, theirs in zip(model.layers, hf.model.layers):
        assert ours.residual_scale == theirs.residual_multiplier
        assert ours.attn.spec.scale == theirs.self_attn.scaling
        assert (ours.attn.o.bias is not None) == cfg.attention_bias
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_fused_experts_are_split_per_expert():
    """input_linear (E, 2I, H) holds gate rows then up rows; output_linear (E, H, I)."""
    E, I, H = 2, 3, 4
    fused = torch.arange(E * 2 * I * H, dtype=torch.float32).view(E, 2 * I, H)
    out = dict(granitemoe.sanitize("model.layers.5.block_sparse_moe.input_linear.weight", fused))
    assert sorted(out) == ["experts.5.0.gate", "experts.5.0.up", "experts.5.1.gate", "experts.5.1.up"]
    assert torch.equal(out["experts.5.1.gate"], fused[1, :I])
    assert torch.equal(out["experts.5.1.up"], fused[1, I:])
    down = torch.randn(E, H, I)
    out = dict(granitemoe.sanitize("model.layers.0.block_sparse_moe.output_linear.weight", down))
    assert torch.equal(out["experts.0.1.down"], down[1])
    assert granitemoe.sanitize("model.layers.2.block_sparse_moe.router.layer.weight", down[0])[0][0] == (
        "layers.2.mlp.router.weight")
    with pytest.raises(ModelLoadError, match="input_linear"):
        granitemoe.sanitize("model.layers.0.block_sparse_moe.input_linear.weight", torch.zeros(2, 3, 4))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    bad = dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        granitemoe.ModelArgs.from_dict(bad)
    with pytest.raises(ModelLoadError, match="config.json: logits_scaling must be positive"):
        granitemoe.ModelArgs.from_dict(dict(config, logits_scaling=0))
