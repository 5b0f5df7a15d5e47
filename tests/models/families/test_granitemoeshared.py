"""Granite MoE with a shared MLP: tiny configs for the shared parity checks, and its own
tests (routing and structure against transformers, the fused shared MLP, refusals)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import granitemoeshared
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock

from models import parity
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # Shared MLP of width 48 next to 4 experts top-2, GQA 2, all multipliers away from 1.
    "granitemoeshared-shared": lambda: tf.GraniteMoeSharedConfig(
        **BASE, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        embedding_multiplier=4.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=2.5,
        tie_word_embeddings=False,
    ),
    # No shared MLP (width 0), GQA 4, 6 experts top-3, attention bias, tied embeddings.
    "granitemoeshared-noshared-tied": lambda: tf.GraniteMoeSharedConfig(
        **BASE, hidden_size=64, intermediate_size=24, shared_intermediate_size=0, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3,
        attention_bias=True, embedding_multiplier=10.0, attention_multiplier=0.2, residual_multiplier=0.3,
        logits_scaling=5.0, tie_word_embeddings=True,
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
    check_routing(hf, model, [layer.block_sparse_moe.router for layer in hf.model.layers])


def test_structure_matches_transformers(pair):
    """Every layer is MoE; a shared MLP of the configured width exactly where transformers
    has one."""
    hf, model, _ = pair
    assert model.args.moe_layers() == list(range(hf.config.num_hidden_layers))
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert isinstance(ours.mlp, MoEBlock)
        assert (ours.mlp.shared is None) == (theirs.shared_mlp is None)
        if theirs.shared_mlp is not None:
            assert isinstance(ours.mlp.shared, MLP)
            assert ours.mlp.shared.up.weight.shape == (hf.config.shared_intermediate_size, hf.config.hidden_size)
        assert ours.residual_scale == theirs.residual_multiplier


def test_fused_shared_mlp_is_split():
    """shared_mlp.input_linear (2S, H) is gate rows then up rows."""
    fused = torch.randn(6, 4)
    out = dict(granitemoeshared.sanitize("model.layers.1.shared_mlp.input_linear.weight", fused))
    assert torch.equal(out["layers.1.mlp.shared.gate.weight"], fused[:3])
    assert torch.equal(out["layers.1.mlp.shared.up.weight"], fused[3:])
    down = torch.randn(4, 3)
    assert granitemoeshared.sanitize("model.layers.1.shared_mlp.output_linear.weight", down) == [
        ("layers.1.mlp.shared.down.weight", down)]
    with pytest.raises(ModelLoadError, match="even number of rows"):
        granitemoeshared.sanitize("model.layers.1.shared_mlp.input_linear.weight", torch.zeros(5, 4))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: rope type 'longrope' is not supported"):
        granitemoeshared.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "longrope"}))
    with pytest.raises(ModelLoadError, match="config.json: shared_intermediate_size must be an integer"):
        granitemoeshared.ModelArgs.from_dict(dict(config, shared_intermediate_size=1.5))
