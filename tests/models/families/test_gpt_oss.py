"""gpt-oss: tiny configs for the shared parity checks, and its own tests (biased routing by
hand, routing and structure against transformers, attention sinks and the clamped SwiGLU
against transformers' own functions, expert biases end to end, MXFP4 checkpoints,
refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from transformers.models.gpt_oss import modeling_gpt_oss as hf_gpt_oss

import edgemoe
from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.experts import glu
from edgemoe.models import gpt_oss
from edgemoe.models.attention import add_sink
from edgemoe.models.moe import MoEBlock
from edgemoe.models.routers import Router

from models import parity
from store.helpers import PROMPTS, make_converted, manifest, min_budget, run_prompts
from store.mxfp4_helpers import randomize_gpt_oss, write_mxfp4_checkpoint

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=None, max_position_embeddings=512)

CONFIGS = {
    # GQA 2, layers alternating window 4 / full (GptOssConfig's default layer_types),
    # 4 experts top-2, q/k/v/o biases, YaRN rope (factor 4 over a 128-token context).
    "gpt_oss-sliding-yarn": lambda: tf.GptOssConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 128, "rope_theta": 150000.0},
    ),
    # MHA, head_dim 8 != hidden / heads, explicit layer_types (full, then two windows of
    # 6), no attention biases, 8 experts top-3, tied embeddings, plain rope.
    "gpt_oss-mha-tied": lambda: tf.GptOssConfig(
        **BASE, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, num_local_experts=8, num_experts_per_tok=3, sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"], attention_bias=False,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def hf_routing(hf, ids: torch.Tensor) -> list[tuple]:
    """(logits, top-k weights, top-k ids) each of transformers' routers returns on one forward."""
    routers = [layer.mlp.router for layer in hf.model.layers]
    out = [None] * len(routers)
    handles = [r.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


@pytest.fixture(scope="module")
def biased(tmp_path_factory, tokenizer_dir):
    """A checkpoint whose expert biases, router biases and sinks are all non-zero (the
    default init zeroes expert biases) and whose experts are large enough that the
    SwiGLU clamps really clip."""
    out = tmp_path_factory.mktemp("gpt_oss-biased")
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt_oss-sliding-yarn"]()).eval()
    randomize_gpt_oss(hf, seed=3)
    hf.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return hf, out


def test_biased_router_by_hand():
    """logits = W x + b with W the identity: x (1, 0.5, 2, -1) and b (0, 1, -1.5, 0) give
    (1, 1.5, 0.5, -1); the top two are experts 1 and 0 with weights
    e^1.5 / (e^1.5 + e^1) = 0.6225 and 0.3775 (softmax over the two logits)."""
    r = Router(4, 4, 2, norm_topk=True, bias=True)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
        r.bias.copy_(torch.tensor([0.0, 1.0, -1.5, 0.0]))
    weights, ids, logits = r(torch.tensor([[1.0, 0.5, 2.0, -1.0]]))
    assert logits.tolist() == [[1.0, 1.5, 0.5, -1.0]]
    assert ids.tolist() == [[1, 0]]
    w1 = math.exp(1.5) / (math.exp(1.5) + math.exp(1.0))
    assert w1 == pytest.approx(0.622459, abs=1e-6)
    torch.testing.assert_close(weights, torch.tensor([[w1, 1 - w1]]), atol=1e-6, rtol=0)


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size, seed=2)
    ours = parity.routed_layers(model, ids)
    theirs = hf_routing(hf, ids)
    assert sorted(ours) == model.args.moe_layers() == list(range(len(theirs)))
    for layer, (want_logits, want_w, want_ids) in enumerate(theirs):
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
        got_ids, order = got_ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-5, rtol=0)


def test_structure_matches_transformers(pair):
    """Every layer is MoE; windows, biases, sinks and the softmax scale sit where
    transformers has them."""
    hf, model, _ = pair
    cfg = hf.config
    assert len(model.layers) == len(hf.model.layers) == cfg.num_hidden_layers
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    for ours, theirs in zip(model.layers, hf.model.layers):
        assert isinstance(ours.mlp, MoEBlock) and isinstance(theirs.mlp, hf_gpt_oss.GptOssMLP)
        assert ours.mlp.shared is None and ours.mlp.router.bias is not None
        assert ours.attn.spec.sliding_window == theirs.self_attn.sliding_window
        assert ours.attn.spec.scale == theirs.self_attn.scaling
        assert torch.equal(ours.attn.sinks, theirs.self_attn.sinks)
        assert (ours.attn.o.bias is not None) == (ours.attn.q.bias is not None) == cfg.attention_bias
    assert model.args.expert_act == "swiglu_clamped"
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


@pytest.mark.parametrize("offset,window", [(0, None), (0, 3), (6, None), (6, 4)])
def test_sinks_match_transformers_eager_attention(offset, window):
    """add_sink + SDPA equals transformers' eager gpt-oss attention (sink logit joins the
    softmax, then is dropped), with and without a cache offset and a window."""
    torch.manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 5, 8
    S = offset + T
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    sinks = torch.randn(H) * 2
    q_pos, k_pos = torch.arange(offset, S)[:, None], torch.arange(S)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = H // KV, sinks
    additive = torch.zeros(T, S).masked_fill(~allowed, float("-inf")).expand(B, 1, T, S)
    want, _ = hf_gpt_oss.eager_attention_forward(module, q, k, v, additive, scaling=D**-0.5)  # (B, T, H, D)
    mask = None if window is None and offset == 0 else allowed
    qs, ks, vs, m, causal = add_sink(q, k, v, mask, mask is None, sinks, D**-0.5)
    got = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, is_causal=causal, scale=D**-0.5,
                                                           enable_gqa=True)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-6, rtol=0)
    # A very negative sink is no sink at all.
    none = add_sink(q, k, v, mask, mask is None, torch.full((H,), -1e4), D**-0.5)
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=D**-0.5)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(
        *none[:3], attn_mask=none[3], scale=D**-0.5, enable_gqa=True), plain, atol=1e-6, rtol=0)


def test_clamped_swiglu_matches_transformers():
    """experts.glu("swiglu_clamped") on de-interleaved gate/up equals GptOssExperts'
    gate on the interleaved tensor, well past the clamps (|x| up to 20)."""
    cfg = CONFIGS["gpt_oss-sliding-yarn"]()
    experts = hf_gpt_oss.GptOssExperts(cfg)
    order = torch.randperm(802, generator=torch.Generator().manual_seed(0))
    gate_up = torch.linspace(-20, 20, 802).view(1, -1)[:, order]  # (1, 2I) interleaved
    want = experts._apply_gate(gate_up)
    got = glu("swiglu_clamped")(gate_up[:, 0::2], gate_up[:, 1::2])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (gate_up[:, 0::2] > 7).any() and (gate_up[:, 1::2].abs() > 7).any()


def test_fused_experts_are_split_per_expert():
    """gate_up_proj (E, H, 2I) alternates gate and up columns; down_proj is (E, I, H);
    biases and MXFP4 codes alternate gate and up rows."""
    E, H, I = 2, 4, 3
    fused = torch.arange(E * H * 2 * I, dtype=torch.float32).view(E, H, 2 * I)
    out = dict(gpt_oss.sanitize("model.layers.1.mlp.experts.gate_up_proj", fused))
    assert sorted(out) == ["experts.1.0.gate", "experts.1.0.up", "experts.1.1.gate", "experts.1.1.up"]
    assert torch.equal(out["experts.1.1.gate"], fused[1][:, 0::2].T)
    assert torch.equal(out["experts.1.1.up"], fused[1][:, 1::2].T)
    assert out["experts.1.0.up"][0].tolist() == [1.0, 7.0, 13.0, 19.0]  # column 1 of expert 0
    down = torch.randn(E, I, H)
    assert torch.equal(dict(gpt_oss.sanitize("model.layers.0.mlp.experts.down_proj", down))["experts.0.1.down"],
                       down[1].T)
    bias = torch.arange(E * 2 * I, dtype=torch.float32).view(E, 2 * I)
    out = dict(gpt_oss.sanitize("model.layers.0.mlp.experts.gate_up_proj_bias", bias))
    assert out["experts.0.1.gate_bias"].tolist() == [6.0, 8.0, 10.0] and out["experts.0.1.up_bias"].tolist() == [
        7.0, 9.0, 11.0]
    blocks = torch.arange(E * 2 * I * 2 * 16, dtype=torch.uint8).view(E, 2 * I, 2, 16)
    out = dict(gpt_oss.sanitize("model.layers.0.mlp.experts.gate_up_proj_blocks", blocks))
    assert torch.equal(out["experts.0.1.up_blocks"], blocks[1, 1::2])
    assert gpt_oss.sanitize("model.layers.0.self_attn.sinks", torch.zeros(4))[0][0] == "layers.0.attn.sinks"
    assert gpt_oss.sanitize("model.layers.0.mlp.router.bias", torch.zeros(4))[0][0] == "layers.0.mlp.router.bias"
    with pytest.raises(ModelLoadError, match="gate_up_proj_scales"):
        gpt_oss.sanitize("model.layers.0.mlp.experts.gate_up_proj_scales", torch.zeros(2, 3, 4, 5, dtype=torch.uint8))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    for key, value, match in [
        ("swiglu_limit", 5.0, "config.json: swiglu_limit 5.0 is not supported"),
        ("swiglu_alpha", 1.5, "config.json: swiglu_alpha 1.5 is not supported"),
        ("layer_types", ["chunked_attention"] * 3, "config.json: unsupported layer_types entries: chunked_attention"),
        ("layer_types", ["full_attention"], "config.json: layer_types has 1 entries for 3 layers"),
        ("quantization_config", {"quant_method": "fp8"}, "config.json: quantization_config.quant_method 'fp8'"),
    ]:
        with pytest.raises(ModelLoadError, match=match):
            gpt_oss.ModelArgs.from_dict(dict(config, **{key: value}))


def test_config_defaults_follow_gpt_oss_config():
    """Without rope keys transformers uses YaRN (factor 32 over 4096) with theta 150000;
    without layer_types even layers slide; head_dim defaults to 64."""
    config = dict(model_type="gpt_oss", vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    args = gpt_oss.ModelArgs.from_dict(config)
    want = tf.GptOssConfig(**{k: v for k, v in config.items() if k != "model_type"})
    assert args.rope_theta == want.rope_parameters["rope_theta"] == 150000.0
    assert args.rope_scaling["rope_type"] == "yarn" and args.rope_scaling["factor"] == 32.0
    assert args.rope_scaling["original_max_position_embeddings"] == 4096 and args.rope_scaling["truncate"] is False
    assert args.layer_types == want.layer_types and args.head_dim == want.head_dim == 64
    assert [args.window(i) for i in range(3)] == [128, None, 128]


def test_expert_biases_end_to_end(biased, tmp_path):
    """Non-zero expert biases, clamping experts: in-RAM logits match transformers, and the
    offloaded runtime (whose store holds the biases, manifest version 3) gives the in-RAM
    tokens at the smallest budget."""
    hf, out = biased
    model, _ = load_hf(out)
    parity.check_logits(hf, model)
    ref_engine = edgemoe.load(out)
    try:
        ref = run_prompts(ref_engine)
    finally:
        ref_engine.close()
    conv = make_converted(out, tmp_path / "conv")
    m = manifest(conv)
    assert m["version"] == 3 and m["expert_biases"] == {"dtype": "float32", "parts": ["b13", "b2"]}
    assert [p["name"] for p in m["formats"]["fp32"]["parts"]] == ["w13", "w2", "b13", "b2"]
    for memory in (min_budget(conv), None):
        engine = edgemoe.load(conv, memory=memory, prefetch=memory is not None)
        try:
            assert run_prompts(engine, PROMPTS) == ref, memory
        finally:
            engine.close()


def test_mxfp4_checkpoint_matches_transformers_on_dequantized_weights(biased, tmp_path):
    """A checkpoint with MXFP4 experts (blocks/scales as released) loads with its experts
    kept as codes and matches transformers run on the weights transformers' own MXFP4
    dequantization gives."""
    hf, src = biased
    ref = write_mxfp4_checkpoint(hf, src, tmp_path / "mx")
    model, ckpt = load_hf(tmp_path / "mx")
    assert ckpt.expert_format == "mxfp4"
    expert = model.layers[0].mlp.provider.table[(0, 0)]
    assert type(expert).__name__ == "QuantExpert" and expert.b13 is not None
    parity.check_logits(ref, model)


def test_released_gpt_oss_20b_config():
    """openai/gpt-oss-20b's config.json as released (legacy rope_scaling, no dtype, no
    swiglu_alpha, extra keys): the shape we build and the bf16 compute its MXFP4 weights get."""
    from edgemoe.checkpoint import config_dtype
    from edgemoe.quant.formats import get_format
    from edgemoe.store.manifest import FormatInfo

    config = {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }
    args = gpt_oss.ModelArgs.from_dict(config)
    assert (args.experts_per_layer, args.top_k, args.expert_dim, args.head_dim) == (32, 4, 2880, 64)
    assert args.moe_layers() == list(range(24)) and [args.window(i) for i in (0, 1)] == [128, None]
    assert args.rope_theta == 150000.0 and args.rope_scaling["factor"] == 32.0
    assert config_dtype(config) == torch.bfloat16
    info = FormatInfo.of(get_format("mxfp4"), 2880, 2880)
    assert info.bits == 4.25 and info.size == 3 * 2880 * (90 * 16 + 90)  # whole rows, 64-byte aligned parts
