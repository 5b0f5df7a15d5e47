"""DBRX: tiny configs for the shared parity checks, and its own tests (p-norm routing by
hand, routing and structure against transformers with random norms, the nested config,
the (E*I, H) expert layout, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import dbrx
from edgemoe.models.moe import MoEBlock
from edgemoe.models.norms import LayerNormNoBias

from models import parity
from models.families.test_ernie4_5_moe import identity_router, perturb
from models.parity import hf_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_seq_len=512)

CONFIGS = {
    # GQA 2, clip_qkv 0.3 (clamps most q/k/v values of these weights), top-2 of 4 renormalised
    # by the sum (p = 1), rope theta 5e5 in both places a config keeps it.
    "dbrx-clip-gqa2-top2": lambda: tf.DbrxConfig(
        **BASE, d_model=64, n_heads=4, n_layers=2,
        attn_config={"clip_qkv": 0.3, "kv_n_heads": 2, "rope_theta": 5e5},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    ),
    # MQA, clip_qkv 8 as the released models (rarely reached; transformers 5.24 fails
    # without one), top-3 of 6 normalised by the 2-norm, gelu experts, linear rope.
    "dbrx-pnorm2-gelu-linear": lambda: tf.DbrxConfig(
        **BASE, d_model=64, n_heads=4, n_layers=3,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": 1, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 6, "moe_top_k": 3, "moe_normalize_expert_weights": 2.0,
                    "ffn_act_fn": {"name": "gelu"}},
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}

TINY = dict(model_type="dbrx", vocab_size=8, d_model=4, n_heads=1, n_layers=1,
            attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 3, "moe_num_experts": 4, "moe_top_k": 2})


def tiny(**ffn) -> dict:
    return dict(TINY, ffn_config=dict(TINY["ffn_config"], **ffn))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """transformers' model with random norm weights, saved, and ours."""
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def test_pnorm_routing_by_hand():
    """Logits ln(1, 2, 3, 4): probabilities (0.1, 0.2, 0.3, 0.4), top two experts 3 and 2
    with 0.4 and 0.3. Divided by their 1-norm 0.7: 4/7, 3/7; by their 2-norm
    sqrt(0.16 + 0.09) = 0.5: 0.8, 0.6; with no normalisation: 0.4, 0.3."""
    x = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])
    for p, want, kind in ((1.0, [4 / 7, 3 / 7], "softmax"), (2.0, [0.8, 0.6], "softmax-pnorm"),
                          (None, [0.4, 0.3], "softmax")):
        r = identity_router(dbrx, dbrx.ModelArgs.from_dict(tiny(moe_normalize_expert_weights=p)))
        assert r.kind == kind
        weights, ids, logits = r(x)
        torch.testing.assert_close(logits, x)
        assert ids.tolist() == [[3, 2]]
        torch.testing.assert_close(weights, torch.tensor([want]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    """Logits, chosen experts (as sets) and weights equal transformers' on every layer
    (its router gives the logits, route_tokens_to_experts the weights and ids), and the
    logits match with the random norm weights."""
    hf, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size, seed=2)
    ours = parity.routed_layers(model, ids)
    blocks = hf.transformer.blocks
    theirs = hf_routing(hf, [b.ffn.router for b in blocks], ids)
    assert sorted(ours) == list(range(len(blocks)))
    for layer, block, logits in zip(sorted(ours), blocks, theirs, strict=True):
        want_w, want_ids = block.ffn.route_tokens_to_experts(logits)
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0)
        got_ids, order = got_ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        assert torch.equal(got_ids, want_ids), layer
        torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-5, rtol=0)
    parity.check_logits(hf, model)


def test_structure_matches_transformers(pair):
    """Every layer MoE; bias-free LayerNorms where transformers has them; the fused
    projection, clip and KV heads as configured; an untied head."""
    hf, model, _ = pair
    cfg = hf.config
    assert len(model.layers) == len(hf.transformer.blocks) == cfg.n_layers
    for ours, theirs in zip(model.layers, hf.transformer.blocks, strict=True):
        assert isinstance(ours.mlp, MoEBlock) and ours.mlp.shared is None
        assert ours.mlp.num_experts == theirs.ffn.experts.num_experts and ours.mlp.router.top_k == theirs.ffn.top_k
        for norm, ref in ((ours.norm1, theirs.norm_attn_norm.norm_1), (ours.norm2, theirs.norm_attn_norm.norm_2)):
            assert isinstance(norm, LayerNormNoBias) and ref.bias is None and norm.eps == ref.eps
        attn = theirs.norm_attn_norm.attn
        assert ours.attn.qkv.weight.shape == attn.Wqkv.weight.shape and ours.attn.qkv.bias is None
        assert ours.attn.spec.clip_qkv == attn.clip_qkv
        assert ours.attn.spec.kv_heads == attn.num_key_value_heads
    assert isinstance(model.norm, LayerNormNoBias)
    assert model.args.rope_theta == cfg.rope_parameters["rope_theta"]
    assert hasattr(model, "lm_head")


def test_fused_experts_are_split_per_expert():
    """w1, v1 (E*I, H) hold the experts' gate and up rows one expert after another; w2
    (E*I, H) their down projections transposed."""
    args = dbrx.ModelArgs.from_dict(TINY)  # E 4, I 3, H 4: the config says how to split
    E, I, H = 4, 3, 4
    t = torch.arange(E * I * H, dtype=torch.float32).view(E * I, H)
    gate = dict(dbrx.sanitize(args=args, name="transformer.blocks.0.ffn.experts.mlp.w1", tensor=t))
    assert sorted(gate) == [f"experts.0.{e}.gate" for e in range(E)]
    assert torch.equal(gate["experts.0.2.gate"], t[2 * I : 3 * I])
    up = dict(dbrx.sanitize(args=args, name="transformer.blocks.0.ffn.experts.mlp.v1", tensor=t))
    assert torch.equal(up["experts.0.3.up"], t[3 * I :])
    down = dict(dbrx.sanitize(args=args, name="transformer.blocks.0.ffn.experts.mlp.w2", tensor=t))
    assert down["experts.0.1.down"].shape == (H, I) == (args.hidden_size, args.expert_dim)
    assert torch.equal(down["experts.0.1.down"], t[I : 2 * I].T)
    qkv = dbrx.sanitize(args=args, name="transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", tensor=t)
    assert qkv[0][0] == "layers.0.attn.qkv.weight"
    with pytest.raises(ModelLoadError, match=r"'transformer.blocks.0.ffn.experts.mlp.w1' has shape \(13, 4\)"):
        dbrx.sanitize(args=args, name="transformer.blocks.0.ffn.experts.mlp.w1", tensor=torch.zeros(13, 4))


def test_nested_config():
    """Sizes come from attn_config / ffn_config (transformers' top-level copies ignored),
    errors name the nested key, and an older config's attn_config.rope_theta is the
    rope base when no top-level one exists."""
    args = dbrx.ModelArgs.from_dict(dict(TINY, num_key_value_heads=7, attn_config={"kv_n_heads": 1, "rope_theta": 5e5}))
    assert (args.num_key_value_heads, args.head_dim, args.rope_theta) == (1, 4, 5e5)
    assert (args.experts_per_layer, args.top_k, args.expert_dim, args.hidden_act) == (4, 2, 3, "silu")
    with pytest.raises(ModelLoadError, match="config.json: ffn_config.moe_top_k must be an integer, got 1.5"):
        dbrx.ModelArgs.from_dict(tiny(moe_top_k=1.5))
    with pytest.raises(ModelLoadError, match="config.json: attn_config.clip_qkv must be positive"):
        dbrx.ModelArgs.from_dict(dict(TINY, attn_config={"clip_qkv": 0}))
    with pytest.raises(ModelLoadError, match="config.json: ffn_config must be an object"):
        dbrx.ModelArgs.from_dict(dict(TINY, ffn_config=[1]))
    with pytest.raises(ModelLoadError, match=r"attn_config.rope_theta \(500000\) disagrees with the top-level rope "
                                             r"theta \(10000\)"):
        dbrx.ModelArgs.from_dict(dict(TINY, attn_config={"rope_theta": 5e5}, rope_parameters={"rope_theta": 1e4}))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    ffn = config["ffn_config"]
    with pytest.raises(ModelLoadError, match="config.json: ffn_config.ffn_act_fn .* is not supported"):
        dbrx.ModelArgs.from_dict(dict(config, ffn_config=dict(ffn, ffn_act_fn={"name": "silu", "inplace": True})))
    with pytest.raises(ModelLoadError, match="config.json: ffn_config.ffn_act_fn .* is not supported"):
        dbrx.ModelArgs.from_dict(dict(config, ffn_config=dict(ffn, ffn_act_fn={"name": "tanh"})))
    with pytest.raises(ModelLoadError, match="config.json: tie_word_embeddings is not supported for DBRX"):
        dbrx.ModelArgs.from_dict(dict(config, tie_word_embeddings=True))
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        dbrx.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": config["rope_parameters"]["rope_theta"]}))
    with pytest.raises(ModelLoadError, match=r"config.json: d_model \(64\) is not a multiple of n_heads \(3\)"):
        dbrx.ModelArgs.from_dict(dict(config, n_heads=3))
