"""JetMoE (jetmoe): tiny configs for the shared parity checks, and its own tests (the
attention-expert gate and MoA head layout by hand, both routers against transformers with
random biases and norms, structure, names, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from edgemoe.checkpoint import load_hf
from edgemoe.errors import ModelLoadError
from edgemoe.models import jetmoe
from edgemoe.models.attention import Attention, AttentionSpec
from edgemoe.models.rope import RoPE

from models import parity
from models.families.test_ernie4_5_moe import perturb
from models.parity import hf_routing

BASE = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512)

CONFIGS = {
    # 2 KV heads x top-2 attention experts = 4 query heads of 16 channels, 4 experts,
    # rms_norm_eps 1e-5 (final norm only: the layers' norms keep 1e-6), tied embeddings.
    "jetmoe-kv2-top2-tied": lambda: tf.JetMoeConfig(
        **BASE, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
    ),
    # One KV head of 32 channels x top-3 of 6 experts, 3 layers, untied, linear rope.
    "jetmoe-kv1-top3-linear": lambda: tf.JetMoeConfig(
        **BASE, hidden_size=64, intermediate_size=24, num_hidden_layers=3, num_key_value_heads=1, kv_channels=32,
        num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """transformers' model with random biases (MoA and MoE outputs) and norms, saved, and ours."""
    out = tmp_path_factory.mktemp(request.param)
    hf = parity.save(CONFIGS[request.param](), out)
    perturb(hf)
    hf.save_pretrained(out)
    model, _ = load_hf(out)
    return hf, model, out


def moa(E: int = 4, k: int = 2, kv: int = 1, D: int = 2, H: int = 4) -> jetmoe.MoAAttention:
    spec = AttentionSpec(hidden=H, heads=kv * k, kv_heads=kv, head_dim=D)
    return jetmoe.MoAAttention(spec, RoPE(D, 10000.0, None), E, k)


def test_attention_gate_by_hand():
    """Gate logits ln(1, 2, 3, 4): the top two are experts 3 and 2, weighted by a softmax
    over their two logits: 4/7 and 3/7 (the full softmax's 0.4 and 0.3, renormalised)."""
    attn = moa()
    with torch.no_grad():
        attn.router.copy_(torch.eye(4))
    x = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])
    weights, ids, logits = attn.route(x)
    torch.testing.assert_close(logits, x)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 3 / 7]]), atol=1e-6, rtol=0)


@torch.no_grad()
def test_moa_by_hand():
    """One token, one KV head (so attention returns v), head_dim 2, H 4, experts 3 and 2
    chosen with weights 4/7 and 3/7 (gate as above). Each expert's output projection
    e * [I; I] maps the head output v to e * (v, v); the layer output is
    4/7 * 3 * (v, v) + 3/7 * 2 * (v, v) + bias = 18/7 * (v, v) + bias. The k and v
    projections read the first two channels: v = x[:2]."""
    attn = moa()
    attn.router.copy_(torch.eye(4))
    attn.q_experts.copy_(torch.randn(4, 2, 4))
    attn.k.weight.copy_(torch.eye(2, 4))
    attn.v.weight.copy_(torch.eye(2, 4))
    for e in range(4):
        attn.o_experts[e] = e * torch.cat([torch.eye(2), torch.eye(2)])  # (H 4, D 2)
    attn.o_bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[[0.0, math.log(2), math.log(3), math.log(4)]]])  # (1, 1, 4)
    v = x[0, 0, :2]
    want = 18 / 7 * torch.cat([v, v]) + attn.o_bias
    torch.testing.assert_close(attn(x, None)[0, 0], want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_moa_head_layout_matches_repeated_kv():
    """Query head kv-major layout: with 2 KV heads and k=2, slot s's head j must attend with
    KV head j (transformers repeats the KV heads, it does not interleave them). Computed
    here with plain attention per (slot, kv head) and compared."""
    torch.manual_seed(0)
    attn = moa(E=3, k=2, kv=2, D=4, H=8)
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape))
    x = torch.randn(1, 5, 8)
    weights, ids, _ = attn.route(x[0])
    k = attn.rope(attn.k(x).view(1, 5, 2, 4).transpose(1, 2), attn.k(x).view(1, 5, 2, 4).transpose(1, 2), 0)[1]
    v = attn.v(x).view(1, 5, 2, 4).transpose(1, 2)  # (1, kv, T, D)
    want = attn.o_bias.expand(5, 8).clone()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    for t in range(5):
        for s in range(2):
            e = ids[t, s].item()
            q = (attn.q_experts[e] @ x[0, t]).view(2, 1, 1, 4)  # (kv, 1, 1, D): this slot's heads
            q = attn.rope(q.expand(2, 1, 5, 4), q.expand(2, 1, 5, 4), 0)[0][:, :, t : t + 1]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask[t : t + 1])  # (kv, 1, 1, D)
            want[t] += weights[t, s] * (attn.o_experts[e] @ out.reshape(8))
    torch.testing.assert_close(attn(x, None)[0], want, atol=1e-5, rtol=0)


def hf_topk(gate_out, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' JetMoeTopKGating output (expert-sorted slots) back to per-token
    (logits (N, E), weights (N, k), ids (N, k))."""
    index_sorted, _, batch_gates, expert_size, logits = gate_out
    flat_ids = torch.repeat_interleave(torch.arange(E), torch.tensor(expert_size))
    ids = torch.empty_like(index_sorted).index_put_((index_sorted,), flat_ids)
    weights = torch.empty_like(batch_gates).index_put_((index_sorted,), batch_gates)
    return logits, weights.view(-1, k), ids.view(-1, k)


def assert_same_routing(got, want) -> None:
    (got_logits, got_w, got_ids), (want_logits, want_w, want_ids) = got, want
    torch.testing.assert_close(got_logits.float(), want_logits.float(), atol=1e-5, rtol=0)
    got_ids, order = got_ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-5, rtol=0)


def test_routing_matches_transformers(pair):
    """Both routers of every layer (attention experts and MLP experts) pick the experts
    transformers picks with its weights; logits match with random biases and norms."""
    hf, model, _ = pair
    E, k = model.args.experts_per_layer, model.args.top_k
    ids = parity.prompt_ids(model.args.vocab_size, seed=2)
    mlp = parity.routed_layers(model, ids)
    attn = {}
    hooks = [layer.attn.register_forward_pre_hook(
        lambda m, a, i=i: attn.__setitem__(i, m.route(a[0].reshape(-1, a[0].shape[-1]))))
        for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    layers = hf.model.layers
    theirs = hf_routing(hf, [l.mlp.router for l in layers] + [l.self_attention.experts.router for l in layers], ids)
    assert sorted(mlp) == sorted(attn) == list(range(len(layers)))
    for i in range(len(layers)):
        got_ids, got_w, got_logits = mlp[i]
        assert_same_routing((got_logits, got_w, got_ids), hf_topk(theirs[i], E, k))
        w, a_ids, logits = attn[i]
        assert_same_routing((logits, w, a_ids), hf_topk(theirs[len(layers) + i], E, k))
    parity.check_logits(hf, model)


def test_structure_matches_transformers(pair):
    """Every layer MoA + MoE with biases; query heads = KV heads x k; the KV cache holds
    only the shared KV heads; layer norms at eps 1e-6, the final one at rms_norm_eps."""
    hf, model, _ = pair
    cfg = hf.config
    for ours, theirs in zip(model.layers, hf.model.layers, strict=True):
        a, ta = ours.attn, theirs.self_attention
        assert isinstance(a, jetmoe.MoAAttention) and isinstance(a, Attention)
        assert a.spec.heads == ta.num_heads == cfg.num_key_value_heads * cfg.num_experts_per_tok
        assert a.spec.kv_heads == ta.num_key_value_heads and a.spec.head_dim == ta.head_dim
        assert a.q_experts.shape == ta.experts.input_linear.weight.shape
        assert a.o_experts.shape == ta.experts.output_linear.weight.shape
        assert isinstance(ours.mlp, jetmoe.BiasedMoEBlock) and ours.mlp.num_experts == theirs.mlp.router.num_experts
        assert ours.norm1.eps == theirs.input_layernorm.variance_epsilon == 1e-6
        assert ours.norm2.eps == theirs.post_attention_layernorm.variance_epsilon
    assert model.norm.eps == hf.model.norm.variance_epsilon == cfg.rms_norm_eps
    assert model.kv_bytes_per_token(torch.float32) == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * \
        cfg.kv_channels * 4
    assert model.args.moe_layers() == list(range(cfg.num_hidden_layers))
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_checkpoint_names():
    """kv_proj rows [k | v] split in two; the MLP's input_linear (E, 2I, H) into gate and
    up rows per expert; attention experts stay whole (resident)."""
    kv = torch.arange(24.0).view(6, 4)
    out = dict(jetmoe.sanitize("model.layers.1.self_attention.kv_proj.weight", kv))
    assert torch.equal(out["layers.1.attn.k.weight"], kv[:3]) and torch.equal(out["layers.1.attn.v.weight"], kv[3:])
    fused = torch.randn(2, 6, 4)
    out = dict(jetmoe.sanitize("model.layers.0.mlp.input_linear.weight", fused))
    assert torch.equal(out["experts.0.1.gate"], fused[1, :3]) and torch.equal(out["experts.0.1.up"], fused[1, 3:])
    names = {
        "model.layers.2.mlp.output_linear.weight": "experts.2.0.down",
        "model.layers.2.mlp.bias": "layers.2.mlp.bias",
        "model.layers.2.mlp.router.layer.weight": "layers.2.mlp.router.weight",
        "model.layers.2.self_attention.experts.input_linear.weight": "layers.2.attn.q_experts",
        "model.layers.2.self_attention.experts.output_linear.weight": "layers.2.attn.o_experts",
        "model.layers.2.self_attention.experts.bias": "layers.2.attn.o_bias",
        "model.layers.2.self_attention.experts.router.layer.weight": "layers.2.attn.router",
    }
    for src, want in names.items():
        assert jetmoe.sanitize(src, fused)[0][0] == want
    with pytest.raises(ModelLoadError, match="kv_proj.weight' should be 2-D with an even number of rows"):
        jetmoe.sanitize("model.layers.1.self_attention.kv_proj.weight", torch.zeros(5, 4))


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"config.json: num_attention_heads \(5\) must be num_key_value_heads x "
                                             r"num_experts_per_tok"):
        jetmoe.ModelArgs.from_dict(dict(config, num_attention_heads=5))
    with pytest.raises(ModelLoadError, match=r"config.json: num_experts_per_tok \(9\) must be at most"):
        jetmoe.ModelArgs.from_dict(dict(config, num_experts_per_tok=9))
    with pytest.raises(ModelLoadError, match="config.json: hidden_act 'tanh' is not supported"):
        jetmoe.ModelArgs.from_dict(dict(config, activation_function="tanh"))
    with pytest.raises(ModelLoadError, match="config.json: kv_channels must be an integer"):
        jetmoe.ModelArgs.from_dict(dict(config, kv_channels=None))
    with pytest.raises(ModelLoadError, match="config.json: rope type 'dynamic' is not supported"):
        jetmoe.ModelArgs.from_dict(dict(config, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
