"""GLM-4.5 (glm4_moe): tiny configs for the shared parity checks, and its own tests
(V3 routing by hand, routing and structure against transformers with a non-zero
correction bias, partial-rotary resolution, refusals). The routing helpers here are
shared with the dots1 and minimax_m2 tests."""

from __future__ import annotations

import json
import math
from typing import Callable

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import glm4_moe
from edgemoe.models.base import MLP
from edgemoe.models.moe import MoEBlock

from models import parity
from models.parity import check_routing

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # 8 experts in 4 groups of 2, the best 2 groups kept, top-3, renormalised and scaled
    # by 2.5; two shared experts; dense layer 0; per-head q/k norm; q/k/v bias; GQA 2;
    # default partial rotary (half of head_dim 16).
    "glm4_moe-groups-qknorm-bias": lambda: tf.Glm4MoeConfig(
        **BASE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=2, first_k_dense_replace=1,
        use_qk_norm=True, attention_bias=True, tie_word_embeddings=False,
    ),
    # One group, raw (not renormalised) weights, no shared expert, dense layers 0 and 1,
    # head_dim 24 != 64/4 with 3/4 of it rotated under yarn, GQA 4, tied embeddings.
    "glm4_moe-dense2-noshared-yarn": lambda: tf.Glm4MoeConfig(
        **BASE, hidden_size=64, head_dim=24, intermediate_size=80, moe_intermediate_size=40, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, n_routed_experts=6, num_experts_per_tok=2,
        norm_topk_prob=False, n_shared_experts=0, first_k_dense_replace=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    ),
}


# ----------------------------------------------------------------------------- helpers


def set_correction_bias(hf, biases: Callable[[torch.nn.Module], torch.Tensor | None], out, seed: int = 7):
    """Give every MoE layer of `hf` a random e_score_correction_bias around -1 (all
    corrected scores negative, so experts outside the kept groups must never be chosen)
    and save it again; `biases(layer)` finds a layer's bias buffer (None: dense)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hf.model.layers:
            b = biases(layer)
            if b is not None:
                b.copy_(-1.0 + 0.3 * torch.randn(b.shape, generator=g))
    hf.save_pretrained(out)


def gate_bias(layer):
    gate = getattr(layer.mlp, "gate", None)
    return None if gate is None else gate.e_score_correction_bias


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    set_correction_bias(hf, gate_bias, out)
    model, _ = load_hf(out)
    return hf, model, out


def identity_router(args) -> torch.nn.Module:
    """The family's router with an identity gate, so its logits are its input."""
    r = glm4_moe.v3_router(args)
    with torch.no_grad():
        r.weight.copy_(torch.eye(args.n_routed_experts))
    return r


L3, L9 = math.log(3), math.log(9)  # sigmoid(ln 3) = 0.75, sigmoid(ln 9) = 0.9, sigmoid(-ln 9) = 0.1


# ----------------------------------------------------------------------------- tests


def test_grouped_sigmoid_routing_by_hand():
    """6 experts in 2 groups of 3, one group kept, top-2, renormalised, scaled by 2.5.

    Token 1, no bias: scores (0.9, 0.1, 0.1 | 0.75, 0.75, 0.1). Group scores are the sum
    of the top two: 1.0 vs 1.5, so the second group wins although the best single expert
    (0.9) is in the first; experts 3 and 4, weights 0.75/1.5 * 2.5 = 1.25 each.

    Token 2, bias (-2, -2, -2, -1, -1, -1) on scores (0.5, 0.5, 0.5 | 0.75, 0.5, 0.25):
    corrected (-1.5 x3 | -0.25, -0.5, -0.75), groups -3 vs -0.75: the second; its best
    two are experts 3 and 4 (the first group is out, not scored 0, which would beat
    them). Weights use the uncorrected scores: 0.75/1.25 * 2.5 = 1.5 and 0.5/1.25 * 2.5 = 1."""
    args = glm4_moe.ModelArgs.from_dict(dict(
        model_type="glm4_moe", vocab_size=8, hidden_size=6, num_hidden_layers=1, num_attention_heads=1,
        head_dim=4, n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        first_k_dense_replace=0))
    r = identity_router(args)
    x = torch.tensor([[L9, -L9, -L9, L3, L3, -L9]])
    weights, ids, logits = r(x)
    assert torch.equal(logits, x)
    assert sorted(ids[0].tolist()) == [3, 4]
    torch.testing.assert_close(weights, torch.tensor([[1.25, 1.25]]), atol=1e-6, rtol=0)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([-2.0, -2, -2, -1, -1, -1]))
    weights, ids, _ = r(torch.tensor([[0.0, 0, 0, L3, 0, -L3]]))
    assert ids[0].tolist() == [3, 4]
    torch.testing.assert_close(weights, torch.tensor([[1.5, 1.0]]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model, [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")])
    parity.check_logits(hf, model)  # with the non-zero correction bias


def test_structure_matches_transformers(pair):
    """Dense and MoE layers, shared-expert width, q/k norms, biases and the rotated width
    are transformers'."""
    hf, model, _ = pair
    cfg = hf.config
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        assert isinstance(ours.mlp, MoEBlock) == isinstance(theirs.mlp, tf.models.glm4_moe.modeling_glm4_moe.Glm4MoeMoE)
        if isinstance(ours.mlp, MoEBlock):
            width = theirs.mlp.shared_experts.intermediate_size
            assert (ours.mlp.shared.gate.out_features if ours.mlp.shared else 0) == width
            assert ours.mlp.shared_gate is None
        else:
            assert isinstance(ours.mlp, MLP) and ours.mlp.gate.out_features == cfg.intermediate_size
        assert hasattr(ours.attn, "q_norm") == cfg.use_qk_norm
        assert (ours.attn.q.bias is not None) == cfg.attention_bias and ours.attn.o.bias is None
        assert ours.attn.rope.dim == 2 * hf.model.rotary_emb.inv_freq.numel()
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_partial_rotary_factor_resolution(pair):
    """0.5 when absent; a top-level value; the rope block's value wins over it."""
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config.pop("head_dim", None)
    plain = dict(config, rope_parameters=rope, hidden_size=64, num_attention_heads=4)  # head_dim 16
    assert glm4_moe.ModelArgs.from_dict(plain).rope_dim == 8
    assert glm4_moe.ModelArgs.from_dict(dict(plain, partial_rotary_factor=0.25)).rope_dim == 4
    both = dict(plain, partial_rotary_factor=0.25, rope_parameters=dict(rope, partial_rotary_factor=0.75))
    assert glm4_moe.ModelArgs.from_dict(both).rope_dim == 12


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="config.json: scoring_func 'softmax' is not supported"):
        glm4_moe.ModelArgs.from_dict(dict(config, scoring_func="softmax"))
    rope = dict(config["rope_parameters"], partial_rotary_factor=1.5)
    with pytest.raises(ModelLoadError, match="config.json: partial_rotary_factor must be in"):
        glm4_moe.ModelArgs.from_dict(dict(config, rope_parameters=rope))
    odd = dict(config, head_dim=20, rope_parameters=dict(rope, partial_rotary_factor=0.25))  # 5 channels
    with pytest.raises(ModelLoadError, match="rotates 5 channels"):
        glm4_moe.ModelArgs.from_dict(odd)
    with pytest.raises(ModelLoadError, match="config.json: n_group 5 does not divide"):
        glm4_moe.ModelArgs.from_dict(dict(config, n_group=5, topk_group=1))
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        glm4_moe.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


def test_sanitize_names():
    t = torch.zeros(3)
    assert glm4_moe.sanitize("model.layers.4.mlp.gate.e_score_correction_bias", t)[0][0] == (
        "layers.4.mlp.router.e_score_correction_bias")
    assert glm4_moe.sanitize("model.layers.4.mlp.shared_experts.up_proj.weight", torch.zeros(2, 2))[0][0] == (
        "layers.4.mlp.shared.up.weight")
    assert glm4_moe.sanitize("model.layers.4.mlp.shared_experts.up_proj.weight", torch.zeros(0, 2)) == []
    assert glm4_moe.sanitize("model.layers.4.mlp.experts.7.down_proj.weight", t)[0][0] == "experts.4.7.down"


def test_mtp_layers_past_the_decoder_are_skipped(tmp_path, tokenizer_dir):
    """GLM-4.5 ships its multi-token-prediction layer as model.layers.<num_hidden_layers>:
    a checkpoint with such a layer loads (it is skipped, as in transformers)."""
    from safetensors.torch import load_file, save_file

    from edgemoe.checkpoint import load_hf
    from models import parity

    cfg = next(iter(CONFIGS.values()))()
    parity.save(cfg, tmp_path, tokenizer_dir)
    f = tmp_path / "model.safetensors"
    weights = load_file(f)
    last = cfg.num_hidden_layers - 1
    extra = {k.replace(f"model.layers.{last}.", f"model.layers.{last + 1}."): v.clone()
             for k, v in weights.items() if k.startswith(f"model.layers.{last}.")}
    extra[f"model.layers.{last + 1}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file({**weights, **extra}, str(f), metadata={"format": "pt"})
    model, _ = load_hf(tmp_path)
    assert len(model.layers) == cfg.num_hidden_layers
