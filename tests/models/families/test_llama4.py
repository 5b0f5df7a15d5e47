"""Llama 4 (text): tiny configs for the shared parity checks, and its own tests (routing
and the input-scaled MoE by hand and against transformers, the MoE/dense and RoPE/NoPE
layer structure, chunked attention and temperature by hand, the fused expert split, the
multimodal checkpoint layout, released-config values, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import llama4
from edgemoe.models.attention import Attention, AttentionSpec, temperature_scales
from edgemoe.models.moe import InRAMProvider, MoEBlock
from edgemoe.models.routers import InputScaledRouter

from models import parity

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512, tie_word_embeddings=False,
            hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=96)

SCOUT = dict(
    BASE, num_hidden_layers=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1,
    attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=4, attn_scale=0.5,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                         high_freq_factor=1.0, original_max_position_embeddings=64),
)

CONFIGS = {
    # Scout-shaped: every layer MoE (top-1), RoPE layers 0 and 2 chunked (8 < the test
    # sequences) with L2 q/k norm, NoPE layers 1 and 3 with a temperature that grows every
    # 4 positions, llama3 rope with equal band factors (a hard cut, as Scout ships it).
    "llama4-scout": lambda: tf.Llama4TextConfig(**SCOUT),
    # Maverick-shaped: dense layers (width intermediate_size_mlp) interleaved with MoE
    # layers of 6 experts top-2, no q/k norm, attention bias, no chunking, no temperature,
    # explicit no_rope_layers, llama3 rope with a smoothed band, GQA 4.
    "llama4-maverick": lambda: tf.Llama4TextConfig(
        **BASE, num_hidden_layers=4, num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=2,
        interleave_moe_layer_step=2, use_qk_norm=False, attention_bias=True, attention_chunk_size=None,
        attn_temperature_tuning=False, no_rope_layers=[1, 1, 0, 1],
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    model, _ = load_hf(out)
    return hf, model, out


# ----------------------------------------------------------------------------- routing


def test_router_by_hand():
    """Top k of the raw logits, each weighted by the sigmoid of its own logit."""
    r = InputScaledRouter(2, 4, 2)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    # logits: token 0 [2, -1, -2, 1] -> experts 0, 3; token 1 [-1, 3, 1, 2] -> experts 1, 3.
    weights, ids, logits = r(x)
    assert ids.tolist() == [[0, 3], [1, 3]]
    torch.testing.assert_close(logits, torch.tensor([[2.0, -1.0, -2.0, 1.0], [-1.0, 3.0, 1.0, 2.0]]))
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    torch.testing.assert_close(weights, torch.tensor([[s(2), s(1)], [s(3), s(2)]]))
    assert r.scales_input and not r.supports_adaptive


@pytest.mark.parametrize("tokens", [1, 2])
def test_moe_block_scales_expert_inputs_by_hand(tokens):
    """Expert e(x) = (e + 1) * x**2 is not linear, so scaling its input by w gives
    (e + 1) * w**2 * x**2, not w * (e + 1) * x**2; the outputs add up unweighted, plus the
    shared expert. Both the one-token and the batched paths."""
    r = InputScaledRouter(2, 3, 2)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    block = MoEBlock(0, r, shared=lambda x: x + 10)
    block.provider = InRAMProvider({(0, e): (lambda x, c=e + 1: c * x * x) for e in range(3)})
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]])[:tokens]
    # token 0: logits [0, 2, 1] -> experts 1 (w = s(2)) and 2 (w = s(1))
    # token 1: logits [0, 1, 2] -> experts 2 (w = s(2)) and 1 (w = s(1))
    s2, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    want = torch.tensor([
        [(2 * s2**2 + 3 * s1**2) * 4 + 12, (2 * s2**2 + 3 * s1**2) * 1 + 11],
        [(3 * s2**2 + 2 * s1**2) * 1 + 11, (3 * s2**2 + 2 * s1**2) * 4 + 12],
    ])[:tokens]
    torch.testing.assert_close(block(x), want)


def test_routing_matches_transformers(pair):
    """Router logits, the chosen experts and their weights equal transformers' on one forward."""
    hf, model, _ = pair
    theirs = {}
    hooks = [
        layer.feed_forward.router.register_forward_hook(
            lambda mod, inp, out, i=i: theirs.__setitem__(i, out))
        for i, layer in enumerate(hf.model.layers) if layer.is_moe_layer
    ]
    ids = parity.prompt_ids(model.args.vocab_size, batch=2)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in hooks:
            h.remove()
    ours = parity.routed_layers(model, ids)
    assert sorted(ours) == sorted(theirs) == model.args.moe_layers()
    for layer, (scores, logits) in theirs.items():
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0)
        chosen = scores > 0  # (N, E): sigmoid of the chosen logits, 0 elsewhere
        assert (got_ids.sort(dim=-1).values == chosen.nonzero()[:, 1].view(got_ids.shape)).all()
        torch.testing.assert_close(got_w, scores.gather(1, got_ids), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- structure


def test_structure_matches_transformers(pair):
    """MoE vs dense (and their widths), RoPE vs NoPE, q/k norms, chunking, temperature and
    biases per layer, as transformers builds them."""
    hf, model, _ = pair
    cfg = hf.config
    assert model.args.moe_layers() == [i for i, layer in enumerate(hf.model.layers) if layer.is_moe_layer]
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers, strict=True)):
        spec, attn = ours.attn.spec, theirs.self_attn
        if theirs.is_moe_layer:
            assert isinstance(ours.mlp, MoEBlock) and isinstance(ours.mlp.router, InputScaledRouter)
            assert ours.mlp.router.weight.shape == theirs.feed_forward.router.weight.shape
            assert ours.mlp.shared.gate.weight.shape == theirs.feed_forward.shared_expert.gate_proj.weight.shape
        else:
            assert not isinstance(ours.mlp, MoEBlock)
            assert ours.mlp.gate.weight.shape == theirs.feed_forward.gate_proj.weight.shape
        assert spec.use_rope == bool(attn.use_rope)
        assert (spec.qk_norm == "l2") == hasattr(attn, "qk_norm")
        assert (spec.chunk is not None) == (cfg.layer_types[i] == "chunked_attention")
        assert (spec.temperature is not None) == (cfg.attn_temperature_tuning and not attn.use_rope)
        assert (ours.attn.q.bias is not None) == (attn.q_proj.bias is not None)
        assert (ours.attn.o.bias is not None) == (attn.o_proj.bias is not None)


def test_chunked_mask_by_hand():
    """Chunks of 4: query positions 5..7 (after 5 cached) see only positions 4..themselves."""
    attn = Attention(AttentionSpec(hidden=8, heads=1, kv_heads=1, head_dim=8, chunk=4), rope=None)
    mask, causal = attn._mask(3, 5, "cpu")
    assert not causal
    assert mask.int().tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert attn._mask(4, 0, "cpu") == (None, True)  # inside the first chunk: plain causal


def test_temperature_by_hand():
    """floor_scale 4, attn_scale 0.5: 1 for positions 0-2, 1 + 0.5 ln 2 for 3-6, then 1 + 0.5 ln 3."""
    got = temperature_scales(2, 6, 4.0, 0.5)  # positions 2..7
    a, b = 1 + 0.5 * math.log(2), 1 + 0.5 * math.log(3)
    torch.testing.assert_close(got, torch.tensor([1.0, a, a, a, a, b]))


# ----------------------------------------------------------------------------- checkpoints


def test_fused_experts_split_by_hand():
    """gate_up_proj (E, H, 2I): gate = the first I columns, transposed; down_proj (E, I, H) transposed."""
    gate_up = torch.arange(24.0).view(2, 3, 4)  # E 2, H 3, I 2
    out = dict(llama4.sanitize("model.layers.5.feed_forward.experts.gate_up_proj", gate_up))
    assert sorted(out) == ["experts.5.0.gate", "experts.5.0.up", "experts.5.1.gate", "experts.5.1.up"]
    assert out["experts.5.1.gate"].tolist() == [[12, 16, 20], [13, 17, 21]]
    assert out["experts.5.1.up"].tolist() == [[14, 18, 22], [15, 19, 23]]
    down = dict(llama4.sanitize("language_model.model.layers.5.feed_forward.experts.down_proj",
                                torch.arange(12.0).view(2, 2, 3)))
    assert down["experts.5.1.down"].tolist() == [[6, 9], [7, 10], [8, 11]]
    assert llama4.sanitize("vision_model.model.layers.0.mlp.fc1.weight", gate_up) == []
    assert llama4.sanitize("multi_modal_projector.linear_1.weight", gate_up) == []
    assert [n for n, _ in llama4.sanitize("language_model.lm_head.weight", gate_up)] == ["lm_head.weight"]
    with pytest.raises(ModelLoadError, match="gate_up_proj.*has shape \\(2, 3, 3\\)"):
        llama4.sanitize("model.layers.0.feed_forward.experts.gate_up_proj", torch.zeros(2, 3, 3))


@torch.no_grad()
def test_multimodal_checkpoint_loads_text_model(tmp_path):
    """A Llama4ForConditionalGeneration checkpoint (nested text_config, language_model.*
    tensors, vision tower): edgemoe loads the text model and its logits equal transformers'.
    Every weight is random, biases and norms included, and moe_layers is explicit."""
    text = dict(SCOUT, num_hidden_layers=3, moe_layers=[0, 2], num_experts_per_tok=2, attention_bias=True,
                eos_token_id=[1, 3])
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, image_size=28, patch_size=14)
    torch.manual_seed(0)
    hf = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision)).eval()
    for p in hf.parameters():
        p.normal_(0, 0.1 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    assert model.args.model_type == "llama4" and model.args.eos_ids == [1, 3]
    assert model.args.moe_layers() == [0, 2] and not isinstance(model.layers[1].mlp, MoEBlock)
    ids = parity.prompt_ids(model.args.vocab_size, batch=2)
    # Its language model is what a text-only call runs (transformers 5.24's top-level
    # forward fails building its output object without images).
    want = hf.language_model(input_ids=ids).logits  # (2, T, V)
    torch.testing.assert_close(model(ids), want, atol=parity.ATOL, rtol=0)
    parity.check_incremental(model)


# ----------------------------------------------------------------------------- config


def _text(**overrides) -> dict:
    return dict(tf.Llama4TextConfig(**SCOUT).to_dict(), **overrides)


def test_released_config_values():
    """Values released configs carry: attn_temperature_tuning 4 (on), equal llama3 band
    factors; a config naming no theta gets Llama 4's 500000; the multimodal layout."""
    args = llama4.ModelArgs.from_dict(_text(attn_temperature_tuning=4))
    assert args.attn_temperature_tuning and args.rope_scaling["high_freq_factor"] == 1.0
    assert not llama4.ModelArgs.from_dict(_text(attn_temperature_tuning=0)).attn_temperature_tuning
    bare = {k: v for k, v in _text().items() if k not in ("rope_parameters", "rope_theta", "rope_scaling")}
    assert llama4.ModelArgs.from_dict(bare).rope_theta == 500000.0
    outer = llama4.ModelArgs.from_dict({"model_type": "llama4", "text_config": _text(), "vision_config": {}})
    assert outer.model_type == "llama4" and outer.num_local_experts == 4


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=["sliding_attention"] * 4), "layer_types entries: sliding_attention"),
    (dict(layer_types=["chunked_attention"] * 4, attention_chunk_size=None), "attention_chunk_size is null"),
    (dict(no_rope_layers=[1, 2, 1, 0]), "no_rope_layers must hold 0"),
    (dict(no_rope_layers=[1, 0]), "no_rope_layers must hold 0"),
    (dict(moe_layers=[1, 4]), "moe_layers \\[1, 4\\] names layers past"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok \\(5\\)"),
    (dict(attn_temperature_tuning="yes"), "attn_temperature_tuning must be true or false or an integer"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}), "rope type 'dynamic'"),
])
def test_unsupported_options_refused(change, message):
    with pytest.raises(ModelLoadError, match="^config.json: .*" + message):
        llama4.ModelArgs.from_dict(_text(**change))


def test_multimodal_config_errors_name_text_config(tmp_path):
    with pytest.raises(ModelLoadError, match="^config.json: text_config must be an object"):
        llama4.ModelArgs.from_dict({"model_type": "llama4"})
    bad = {"model_type": "llama4", "text_config": _text(hidden_size="64")}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="config.json: text_config: hidden_size must be an integer"):
        load_hf(tmp_path)
