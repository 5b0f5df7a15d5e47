"""DeepSeek-V2: tiny configs for the shared parity checks, and its own tests (softmax
routing by hand, routing and structure against transformers, both MLA attention paths,
the latent cache and what the budget counts for it, refusals). The MLA helpers here
are shared with the deepseek_v3 and glm4_moe_lite tests."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import transformers as tf

import edgemoe
from edgemoe.checkpoint import load_hf
from edgemoe.errors import ContextLengthError, ModelLoadError
from edgemoe.models import deepseek_v2
from edgemoe.models.mla import MLACache, MLAttention
from edgemoe.models.moe import MoEBlock
from edgemoe.models.routers import GroupedRouter

from models import parity
from store.helpers import make_converted

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

# MHA over latents of rank 16 with an 8-wide RoPE key; qk head 12 + 8, v head 10.
MLA = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, max_position_embeddings=512, hidden_size=64,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
           v_head_dim=10, moe_intermediate_size=24, intermediate_size=48)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 0.707,
        "mscale_all_dim": 0.707, "rope_theta": 10000.0}

CONFIGS = {
    # V2-Lite's shape: plain q_proj (no q LoRA), greedy top-2 of 6 softmax experts, two
    # shared experts, dense layer 0, YaRN with mscale_all_dim (softmax scale and RoPE
    # magnitudes both change).
    "deepseek_v2-lite-greedy-yarn": lambda: tf.DeepseekV2Config(
        **MLA, num_hidden_layers=3, q_lora_rank=None, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", tie_word_embeddings=False, rope_parameters=YARN,
    ),
    # q LoRA, group-limited greedy (8 experts in 4 groups by their best expert, 2 groups
    # kept, top-3), routed weights scaled by 2.0, attention bias, one shared expert, every
    # layer MoE, norm eps 1e-5 (the latent norms keep 1e-6), tied embeddings.
    "deepseek_v2-grouped-qlora-bias": lambda: tf.DeepseekV2Config(
        **MLA, num_hidden_layers=2, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=2.0, attention_bias=True,
        n_shared_experts=1, first_k_dense_replace=0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}


# ----------------------------------------------------------------------------- shared MLA helpers


def hf_routing(hf, ids: torch.Tensor) -> dict[int, tuple]:
    """layer -> (logits, weights, ids) transformers' gate returns on one forward."""
    out, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(layer.mlp, "experts"):
            handles.append(gate.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return out


def check_routing(hf, model) -> None:
    """Router logits, chosen experts (as sets) and their weights equal transformers' on
    every MoE layer."""
    ids = parity.prompt_ids(model.args.vocab_size, seed=2)
    ours = parity.routed_layers(model, ids)
    theirs = hf_routing(hf, ids)
    assert sorted(ours) == sorted(theirs) == model.args.moe_layers()
    for layer in ours:
        got_ids, got_w, got_logits = ours[layer]
        want_logits, want_w, want_ids = theirs[layer]
        torch.testing.assert_close(got_logits.float(), want_logits.float(), atol=1e-5, rtol=0)
        got_ids, order = got_ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        assert torch.equal(got_ids, want_ids), layer
        torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-5, rtol=0)


def check_structure(hf, model) -> None:
    """Same MoE/dense layers, shared-expert widths, q path and attention sizes as transformers."""
    cfg = hf.config
    assert len(model.layers) == len(hf.model.layers)
    for i, (ours, theirs) in enumerate(zip(model.layers, hf.model.layers)):
        moe = hasattr(theirs.mlp, "experts")
        assert isinstance(ours.mlp, MoEBlock) == moe == (i in model.args.moe_layers()), i
        if moe:
            width = theirs.mlp.shared_experts.gate_proj.out_features
            assert (ours.mlp.shared.gate.out_features if ours.mlp.shared is not None else 0) == width
        else:
            assert ours.mlp.gate.out_features == theirs.mlp.gate_proj.out_features
        attn, ref = ours.attn, theirs.self_attn
        assert isinstance(attn, MLAttention)
        assert hasattr(attn, "q") == (cfg.q_lora_rank is None) == (ref.q_proj is not None)
        assert attn.kv_b.weight.shape == ref.kv_b_proj.weight.shape
        assert (attn.o.bias is not None) == (ref.o_proj.bias is not None)
        assert attn.spec.scale == pytest.approx(ref.scaling, rel=1e-12)
        assert attn.kv_a_norm.eps == ref.kv_a_layernorm.variance_epsilon  # not rms_norm_eps
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def check_both_paths(hf, model) -> None:
    """The expanded and the absorbed attention each match transformers, full and cached."""
    try:
        for absorb in (False, True):
            for layer in model.layers:
                layer.attn.absorb = absorb
            parity.check_logits(hf, model)
            parity.check_incremental(model)
    finally:
        for layer in model.layers:
            layer.attn.absorb = None


def check_refused(config: dict, module, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        module.ModelArgs.from_dict(config)


def check_mla_refusals(config: dict, module) -> None:
    """Options no MLA family implements are refused, naming the option."""
    check_refused(dict(config, num_key_value_heads=2), module, r"config.json: num_key_value_heads \(2\)")
    rope = dict(config["rope_parameters"], partial_rotary_factor=0.5)
    check_refused(dict(config, rope_parameters=rope), module, "rope_parameters.partial_rotary_factor 0.5")
    check_refused(dict(config, qk_rope_head_dim=7), module, "qk_rope_head_dim must be even")


def fixture_pair(configs: dict):
    @pytest.fixture(scope="module", params=sorted(configs))
    def pair(request, tmp_path_factory):
        out = tmp_path_factory.mktemp(request.param)
        hf = parity.save(configs[request.param](), out)
        model, _ = load_hf(out)
        return hf, model, out
    return pair


pair = fixture_pair(CONFIGS)


def identity_router(router: GroupedRouter) -> GroupedRouter:
    """Router weight = identity, so the logits are the input itself."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts))
    return router


# ----------------------------------------------------------------------------- routing


def test_greedy_softmax_routing_by_hand():
    """logits (2, 1, 0, -1): softmax p_i = e^{z_i} / Z with Z = e^2 + e + 1 + e^-1; greedy
    top-2 keeps experts 0 and 1 with weights 1.5 * p (scaled, never renormalised)."""
    args = deepseek_v2.ModelArgs.from_dict(dict(
        model_type="deepseek_v2", vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
        n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=1.5, kv_lora_rank=4, qk_rope_head_dim=2))
    r = identity_router(deepseek_v2.router(args))
    weights, ids, logits = r(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    z = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    assert logits.tolist() == [[2.0, 1.0, 0.0, -1.0]]
    assert sorted(ids[0].tolist()) == [0, 1]
    want = {0: 1.5 * math.exp(2) / z, 1: 1.5 * math.exp(1) / z}
    assert {i: w for i, w in zip(ids[0].tolist(), weights[0].tolist())} == pytest.approx(want, abs=1e-6)


def test_group_limited_greedy_routing_by_hand():
    """8 experts in 4 groups of 2, groups scored by their best expert, the best 2 kept.
    logits (0, 3 | 2.5, 2.4 | 2.9, -5 | 0, 0): group bests 3, 2.5, 2.9, 0 keep groups 0
    and 2, so the top-3 is experts 1, 4, 0; plain greedy would pick 1, 4, 2."""
    x = torch.tensor([[0.0, 3.0, 2.5, 2.4, 2.9, -5.0, 0.0, 0.0]])
    base = dict(model_type="deepseek_v2", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=4, qk_rope_head_dim=2)
    grouped = deepseek_v2.ModelArgs.from_dict(dict(base, topk_method="group_limited_greedy", n_group=4, topk_group=2))
    weights, ids, _ = identity_router(deepseek_v2.router(grouped))(x)
    p = torch.softmax(x, dim=-1)[0]
    assert sorted(ids[0].tolist()) == [0, 1, 4]
    assert weights[0].tolist() == pytest.approx(p[ids[0]].tolist(), abs=1e-7)
    # p_1 = e^3 / Z with Z = 1 + e^3 + e^2.5 + e^2.4 + e^2.9 + e^-5 + 2
    z = 3 + math.exp(3) + math.exp(2.5) + math.exp(2.4) + math.exp(2.9) + math.exp(-5)
    assert weights[0, ids[0].tolist().index(1)].item() == pytest.approx(math.exp(3) / z, abs=1e-7)
    greedy = deepseek_v2.ModelArgs.from_dict(dict(base, n_group=4, topk_group=2))  # groups unused
    assert sorted(identity_router(deepseek_v2.router(greedy))(x)[1][0].tolist()) == [1, 2, 4]


def test_routing_matches_transformers(pair):
    hf, model, _ = pair
    check_routing(hf, model)


def test_structure_matches_transformers(pair):
    hf, model, _ = pair
    check_structure(hf, model)
    for block in model.moe_blocks():
        assert block.router.scoring == "softmax" and block.router.e_score_correction_bias is None


def test_moe_layer_freq():
    """DeepSeek's rule: MoE from first_k_dense_replace on, on layers divisible by moe_layer_freq."""
    args = deepseek_v2.ModelArgs.from_dict(dict(
        model_type="deepseek_v2", vocab_size=8, hidden_size=4, num_hidden_layers=7, num_attention_heads=1,
        num_experts_per_tok=2, kv_lora_rank=4, qk_rope_head_dim=2, first_k_dense_replace=1, moe_layer_freq=2))
    assert args.moe_layers() == [2, 4, 6]


def test_unsupported_options_refused(pair):
    _, _, out = pair
    config = json.loads((out / "config.json").read_text())
    check_mla_refusals(config, deepseek_v2)
    check_refused(dict(config, topk_method="noaux_tc"), deepseek_v2, "topk_method 'noaux_tc' is not supported")
    check_refused(dict(config, scoring_func="sigmoid"), deepseek_v2, "scoring_func 'sigmoid' is not supported")
    check_refused(dict(config, norm_topk_prob=True), deepseek_v2, "norm_topk_prob true is not supported")
    check_refused(dict(config, mlp_bias=True), deepseek_v2, "mlp_bias true is not supported")
    check_refused(dict(config, topk_method="group_limited_greedy", n_group=None), deepseek_v2,
                  "group_limited_greedy needs n_group and topk_group")
    check_refused(dict(config, topk_method="group_limited_greedy", n_group=5, topk_group=1), deepseek_v2,
                  "n_group 5 does not divide")


# ----------------------------------------------------------------------------- MLA


def test_both_attention_paths_match_transformers(pair):
    hf, model, _ = pair
    check_both_paths(hf, model)


def test_attention_path_choice():
    """Decode steps attend in latent space; a fresh prefill chunk expands K/V."""
    attn = next(iter(load_spec_model().layers)).attn
    assert attn._absorb_cheaper(1, 1000)
    assert not attn._absorb_cheaper(512, 512)


def load_spec_model():
    args = deepseek_v2.ModelArgs.from_dict(dict(
        model_type="deepseek_v2", vocab_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=16,
        num_experts_per_tok=2, kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=None))  # V2-Lite's attention
    with torch.device("meta"):
        return deepseek_v2.build(args)


def test_latent_cache_bytes_are_what_the_budget_counts(pair, tokenizer_dir, tmp_path):
    """One position costs (kv_lora_rank + qk_rope_head_dim) x layers x element size: the
    model reports it, the cache allocates exactly that, and the engine counts it, in RAM
    and converted."""
    hf, model, out = pair
    cfg = hf.config
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert model.kv_bytes_per_token() == per_token
    assert model.kv_bytes_per_token(torch.bfloat16) == per_token // 2
    caches = model.make_cache(32)
    assert all(isinstance(c, MLACache) for c in caches)
    with torch.no_grad():
        model(parity.prompt_ids(cfg.vocab_size, n=5), caches)
    assert sum(c.latent.nbytes for c in caches) == 32 * per_token
    src = tmp_path / "hf"
    shutil.copytree(out, src)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    for path in (src, make_converted(src, tmp_path / "conv")):
        engine = edgemoe.load(path)
        try:
            assert engine.info["kv_bytes"] == engine.info["ctx_size"] * per_token, path
        finally:
            engine.close()


def test_latent_cache_capacity_and_trim(pair):
    """Past the capacity is a ContextLengthError; trimming and re-running a suffix gives
    the same logits (prompt-prefix reuse)."""
    _, model, _ = pair
    ids = parity.prompt_ids(model.args.vocab_size, n=12)
    with torch.no_grad():
        caches = model.make_cache(12)
        full = model(ids, caches)
        with pytest.raises(ContextLengthError, match="context size of 12"):
            model(ids[:, :1], caches)
        for c in caches:
            c.trim(4)
        assert {c.offset for c in caches} == {8}
        again = model(ids[:, 8:], caches)
    torch.testing.assert_close(again, full[:, 8:], atol=1e-5, rtol=0)


def test_sanitize_names():
    t = torch.zeros(2, 2)
    names = {
        "model.layers.3.self_attn.q_proj.weight": "layers.3.attn.q.weight",
        "model.layers.3.self_attn.q_a_proj.bias": "layers.3.attn.q_a.bias",
        "model.layers.3.self_attn.q_a_layernorm.weight": "layers.3.attn.q_a_norm.weight",
        "model.layers.3.self_attn.q_b_proj.weight": "layers.3.attn.q_b.weight",
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": "layers.3.attn.kv_a.weight",
        "model.layers.3.self_attn.kv_a_layernorm.weight": "layers.3.attn.kv_a_norm.weight",
        "model.layers.3.self_attn.kv_b_proj.weight": "layers.3.attn.kv_b.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight": "layers.3.mlp.shared.up.weight",
        "model.layers.3.mlp.experts.5.down_proj.weight": "experts.3.5.down",
    }
    for name, want in names.items():
        assert deepseek_v2.sanitize(name, t) == [(want, t)]
    assert deepseek_v2.sanitize("model.layers.3.mlp.shared_experts.up_proj.weight", torch.zeros(0, 4)) == []
