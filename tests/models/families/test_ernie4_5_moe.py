"""ERNIE-4.5 MoE (ernie4_5_moe): tiny configs for the shared parity checks, and its own
tests (routing with a correction bias and the norm_min clamp by hand, routing and the
layer structure against transformers with a non-zero correction bias, names, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import ernie4_5_moe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock

from models import parity
from models.parity import check_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # MoE on layers 1-2 only (start 1, end 2): dense layers 0 and 3; two shared experts
    # (one MLP of width 2 x 32); no biases; GQA 2; tied embeddings.
    "ernie4_5_moe-range-shared-tied": lambda: tf.Ernie4_5_MoeConfig(
        **BASE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=6, moe_k=2, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=2, tie_word_embeddings=True,
    ),
    # MoE on odd layers (interval 2 from 0 to the end, -1), no shared expert, use_bias on
    # attention, dense MLPs and LM head, top-3 of 8, norm_min 0.8 clamping the
    # renormalisation, GQA 4, linear rope.
    "ernie4_5_moe-interval-bias-normmin": lambda: tf.Ernie4_5_MoeConfig(
        **BASE, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, moe_num_experts=8, moe_k=3, moe_num_shared_experts=0,
        moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=2, use_bias=True, moe_norm_min=0.8,
        tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}

TINY = dict(model_type="ernie4_5_moe", vocab_size=8, hidden_size=4, intermediate_size=8, moe_intermediate_size=4,
            num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=0)


# ----------------------------------------------------------------------------- helpers shared by my families


def perturb(hf, seed: int = 5) -> None:
    """Add noise to every bias and norm weight of `hf`: transformers initialises them to
    0 and 1, where a bias or norm loaded into the wrong place (or a norm applied at the
    wrong point, like before RoPE instead of after) would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def identity_router(module, args):
    """The router of the first MoE layer of `module.build(args)`, with an identity gate so
    that its logits are its input."""
    block = next(module.build(args).moe_blocks())
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(args.experts_per_layer, args.hidden_size))
    return block.router


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """transformers' model with random non-zero correction biases, biases and norms,
    saved, and ours."""
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "experts"):
                b = layer.mlp.gate.moe_statics.e_score_correction_bias  # (1, E)
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


# ----------------------------------------------------------------------------- tests


def test_routing_by_hand():
    """Logits ln(1, 2, 3, 4) give probabilities (0.1, 0.2, 0.3, 0.4). The correction bias
    (0.35, 0, 0, 0) makes the choice scores (0.45, 0.2, 0.3, 0.4): experts 0 and 3,
    weighted by their uncorrected probabilities renormalised: 0.1/0.5 and 0.4/0.5. With
    moe_norm_min 0.8 the sum 0.5 is clamped to 0.8: weights 0.125 and 0.5."""
    x = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])
    for norm_min, want in ((1e-12, [0.2, 0.8]), (0.8, [0.125, 0.5])):
        r = identity_router(ernie4_5_moe, ernie4_5_moe.ModelArgs.from_dict(dict(TINY, moe_norm_min=norm_min)))
        with torch.no_grad():
            r.e_score_correction_bias.copy_(torch.tensor([0.35, 0.0, 0.0, 0.0]))
        weights, ids, logits = r(x)
        torch.testing.assert_close(logits, x)
        order = ids[0].argsort()
        assert ids[0][order].tolist() == [0, 3]
        torch.testing.assert_close(weights[0][order], torch.tensor(want), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "experts")])
    parity.check_logits(hf, model)  # with the non-zero correction bias, biases and norms


def test_structure_matches_transformers(pair):
    """MoE layers by start/end/interval, dense and shared widths, biases everywhere or
    nowhere, interleaved rotary over the whole head."""
    hf, model, _ = pair
    cfg = hf.config
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert isinstance(ours.mlp, MoEBlock) == hasattr(theirs.mlp, "experts")
        if isinstance(ours.mlp, MoEBlock):
            shared = theirs.mlp.shared_experts
            assert (ours.mlp.shared is None) == (shared is None)
            if shared is not None:
                assert ours.mlp.shared.gate.out_features == shared.intermediate_size
                assert (ours.mlp.shared.gate.bias is not None) == cfg.use_bias
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.gate.out_features == theirs.mlp.intermediate_size
            assert (ours.mlp.down.bias is not None) == cfg.use_bias
        assert (ours.attn.q.bias is not None) == (ours.attn.o.bias is not None) == cfg.use_bias
        assert ours.attn.rope.interleaved and ours.attn.rope.dim == cfg.hidden_size // cfg.num_attention_heads
    assert (getattr(model, "lm_head", None) is not None and model.lm_head.bias is not None) == cfg.use_bias
    assert any(not isinstance(layer.mlp, MoEBlock) for layer in model.layers)


def test_layer_range():
    """MoE layers are those with (i + 1) % interval == 0 within [start, end]; end -1 (or
    absent) is the last layer."""
    def moe(**kw):
        return ernie4_5_moe.ModelArgs.from_dict(dict(TINY, num_hidden_layers=6, **kw)).moe_layers()

    assert moe(moe_layer_start_index=1, moe_layer_end_index=-1) == [1, 2, 3, 4, 5]
    assert moe(moe_layer_start_index=1) == [1, 2, 3, 4, 5]
    assert moe(moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=2) == [1, 3]
    assert moe(moe_layer_start_index=2, moe_layer_end_index=4, moe_layer_interval=3) == [2]


def test_sanitize_names():
    """The (1, E) correction bias becomes the router's (E,) one, under either layout;
    multi-token-prediction tensors are dropped."""
    bias = torch.arange(4.0).reshape(1, 4)
    for name in ("model.layers.3.mlp.moe_statics.e_score_correction_bias",
                 "model.layers.3.mlp.gate.moe_statics.e_score_correction_bias"):
        [(key, t)] = ernie4_5_moe.sanitize(name, bias)
        assert key == "layers.3.mlp.router.e_score_correction_bias" and t.shape == (4,)
    assert ernie4_5_moe.sanitize("model.mtp_block.0.self_attn.q_proj.weight", bias) == []
    assert ernie4_5_moe.sanitize("model.mtp_linear_proj.0.weight", bias) == []
    [(key, _)] = ernie4_5_moe.sanitize("model.layers.1.mlp.shared_experts.up_proj.bias", bias)
    assert key == "layers.1.mlp.shared.up.bias"
    with pytest.raises(ModelLoadError, match="unexpected tensor"):
        ernie4_5_moe.sanitize("model.layers.1.mlp.experts.0.gate_proj.bias", bias)


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: use_bias with tie_word_embeddings"):
        ernie4_5_moe.ModelArgs.from_dict(dict(config, use_bias=True, tie_word_embeddings=True))
    with pytest.raises(ModelLoadError, match="config.json: moe_layer_end_index must be non-negative"):
        ernie4_5_moe.ModelArgs.from_dict(dict(config, moe_layer_end_index=-2))
    with pytest.raises(ModelLoadError, match="config.json: moe_num_experts must be an integer"):
        ernie4_5_moe.ModelArgs.from_dict(dict(config, moe_num_experts=[8, 8]))
    with pytest.raises(ModelLoadError, match="config.json: num_experts_per_tok"):
        ernie4_5_moe.ModelArgs.from_dict(dict(config, moe_k=config["moe_num_experts"] + 1))
