"""Every family against transformers on the same tiny random weights: full-sequence
logits, KV-cached incremental and chunked decoding, greedy generation, routing and
the layer structure (which layers are MoE, which use a sliding window).

Each config varies the family's knobs: shared expert on/off, norm_topk_prob, GQA
ratio 1/2/4, odd sizes, dense layers mixed in, tied embeddings, rope scaling, sliding
windows shorter than the sequence, attention biases and clip_qkv.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_checkpoint, tiny_config

from edgemoe.checkpoint import load_hf
from edgemoe.generate import generate_step
from edgemoe.models.moe import InRAMProvider, MoEBlock

# A Qwen2-MoE config without a shared expert makes transformers initialise empty matrices.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

ATOL = 1e-4
SEQ = 20  # longer than every sliding window below
WINDOW = 8


def rope(kind: str, **extra) -> dict:
    return {"rope_type": kind, "rope_theta": extra.pop("theta", 10000.0), **extra}


# name -> (family, overrides of tests/conftest.py:tiny_config)
CONFIGS: dict[str, tuple[str, dict]] = {
    # GQA 2, every layer MoE, a sliding window on every layer, linear rope scaling.
    "mixtral-window-linear": ("mixtral", dict(sliding_window=WINDOW, rope_parameters=rope("linear", factor=2.0))),
    # GQA 1, hidden 60 / head_dim 20, 5 experts top-3, tied embeddings, llama3 rope.
    "mixtral-odd-tied-llama3": ("mixtral", dict(
        hidden_size=60, num_attention_heads=3, num_key_value_heads=3, intermediate_size=52,
        num_local_experts=5, num_experts_per_tok=3, tie_word_embeddings=True,
        rope_parameters=rope("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16),
    )),
    # Shared expert with sigmoid gate, raw top-k weights, qkv bias, dense layers 0 and 2
    # by decoder_sparse_step=2.
    "qwen2-shared-sparse2": ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    # GQA 4, head_dim 20, 7 experts top-3, renormalised, dense layer 2 by mlp_only_layers,
    # sliding window on layer 0 only (max_window_layers=2), tied embeddings, yarn rope.
    "qwen2-gqa4-window-yarn": ("qwen2_moe", dict(
        hidden_size=80, num_attention_heads=4, num_key_value_heads=1, num_experts=7, num_experts_per_tok=3,
        moe_intermediate_size=36, shared_expert_intermediate_size=44, norm_topk_prob=True, mlp_only_layers=[2],
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, tie_word_embeddings=True,
        rope_parameters=rope("yarn", factor=4.0, original_max_position_embeddings=128),
    )),
    # No shared expert (size 0), no qkv bias, GQA 1.
    "qwen2-noshared": ("qwen2_moe", dict(
        shared_expert_intermediate_size=0, norm_topk_prob=True, qkv_bias=False, num_key_value_heads=4,
    )),
    # Explicit head_dim 24 != 64/4, per-head q/k norm, renormalised top-k, dense layer 1.
    "qwen3-headdim-dense": ("qwen3_moe", dict(mlp_only_layers=[1])),
    # GQA 4, hidden 60 with head_dim 20, 5 experts top-3 raw weights, attention bias,
    # sliding window, dense layers 0 and 2, tied embeddings, linear rope with theta 1e6.
    "qwen3-odd-window-bias": ("qwen3_moe", dict(
        hidden_size=60, head_dim=20, num_attention_heads=4, num_key_value_heads=1, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=False, attention_bias=True, use_sliding_window=True,
        sliding_window=WINDOW, num_hidden_layers=4, decoder_sparse_step=2, tie_word_embeddings=True,
        rope_parameters=rope("linear", factor=3.0, theta=1e6),
    )),
    # Full-width q/k norm, clip_qkv that really clips, GQA 2, raw top-k weights.
    "olmoe-clip": ("olmoe", dict(clip_qkv=0.5)),
    # GQA 1, hidden 60, 7 experts top-3 renormalised, attention bias, tied, yarn rope.
    "olmoe-odd-bias-yarn": ("olmoe", dict(
        hidden_size=60, num_attention_heads=3, num_key_value_heads=3, intermediate_size=44, num_experts=7,
        num_experts_per_tok=3, norm_topk_prob=True, attention_bias=True, tie_word_embeddings=True,
        rope_parameters=rope("yarn", factor=2.0, original_max_position_embeddings=256, theta=500000.0),
    )),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(name, HF model, our model) for one config, shared by the tests of this module."""
    name = request.param
    family, overrides = CONFIGS[name]
    out = tmp_path_factory.mktemp(name)
    hf = save_checkpoint(tiny_config(family, **overrides), out)
    model, _ = load_hf(out)
    return name, hf, model


def prompt_ids(vocab: int, n: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, n), generator=g)  # skip bos/eos ids


@torch.no_grad()
def test_loaded_in_fp32(case):
    _, _, model = case
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@torch.no_grad()
def test_structure_matches_hf(case):
    """The same layers are MoE / dense, and windowed, as in transformers."""
    _, hf, model = case
    cfg = hf.config
    hf_moe = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert [isinstance(layer.mlp, MoEBlock) for layer in model.layers] == hf_moe
    assert model.args.moe_layers() == [i for i, m in enumerate(hf_moe) if m]
    if getattr(cfg, "layer_types", None):  # Qwen2-MoE: per layer
        want = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    else:
        want = [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers
    assert [layer.attn.spec.sliding_window for layer in model.layers] == want
    assert model.args.tie_word_embeddings == cfg.tie_word_embeddings
    assert not hasattr(model, "lm_head") or not cfg.tie_word_embeddings


@torch.no_grad()
def test_logits_match_hf(case):
    _, hf, model = case
    ids = prompt_ids(model.args.vocab_size, batch=2)
    want = hf(ids).logits  # (2, T, V)
    got = model(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # last_only returns the final position of the same computation.
    torch.testing.assert_close(model(ids, last_only=True), got[:, -1:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_router_matches_hf(case):
    """Every MoE layer's router logits, chosen experts and weights equal transformers'."""
    _, hf, model = case
    ids = prompt_ids(model.args.vocab_size, seed=2)
    seen = {}
    blocks = list(model.moe_blocks())
    for b in blocks:
        b.hook = lambda layer, i, w, lg: seen.__setitem__(layer, (i, w, lg))
    try:
        model(ids)
    finally:
        for b in blocks:
            b.hook = None
    hf_logits = hf(ids, output_router_logits=True).router_logits  # one (T, E) per MoE layer
    assert sorted(seen) == model.args.moe_layers()
    assert len(hf_logits) == len(seen)
    for layer, want_logits in zip(sorted(seen), hf_logits):
        got_ids, got_w, got_logits = seen[layer]
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
        probs = torch.softmax(want_logits.float(), dim=-1)
        want_w, want_ids = torch.topk(probs, model.args.top_k, dim=-1)
        if getattr(hf.config, "norm_topk_prob", True):  # Mixtral always renormalises
            want_w = want_w / want_w.sum(-1, keepdim=True)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=0)


@torch.no_grad()
def test_incremental_decode_matches_full(case):
    _, _, model = case
    ids = prompt_ids(model.args.vocab_size, seed=3)
    full = model(ids)  # (1, T, V)
    cache = model.make_cache()
    steps = [model(ids[:, :5], cache)]  # prefill
    for t in range(5, SEQ):
        steps.append(model(ids[:, t : t + 1], cache))  # one token at a time, past the window
    assert all(c.offset == SEQ for c in cache)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_chunked_prefill_matches_full(case):
    """A prefill in two chunks (the second attends to a cached prefix through an
    explicit mask) and then single tokens give the full-forward logits."""
    _, _, model = case
    ids = prompt_ids(model.args.vocab_size, seed=4)
    full = model(ids)
    cache = model.make_cache()
    parts = [model(ids[:, :7], cache), model(ids[:, 7:16], cache)]
    parts += [model(ids[:, t : t + 1], cache) for t in range(16, SEQ)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_hf(case):
    _, hf, model = case
    prompt = prompt_ids(model.args.vocab_size, n=6, seed=5)
    # Pure greedy on both sides: transformers must not stop at (or mask) the EOS id.
    hf.generation_config.eos_token_id = None
    want = hf.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, 6:].tolist()
    got = list(generate_step(model, prompt[0].tolist(), max_tokens=32))
    assert len(want) == 32
    assert got == want


class ReversedProvider(InRAMProvider):
    """Hands out the requested experts last-first, as a cache-aware provider may."""

    def experts(self, layer, ids, x, rows=None):
        for e in reversed(list(ids)):
            yield e, self.table[(layer, e)]


@torch.no_grad()
def test_expert_arrival_order_does_not_change_logits(case):
    _, _, model = case
    ids = prompt_ids(model.args.vocab_size, seed=6)
    blocks = list(model.moe_blocks())
    original = blocks[0].provider
    want = model(ids)
    want_step = model(ids[:, :1])  # the single-token path
    reversed_provider = ReversedProvider(original.table)
    for b in blocks:
        b.provider = reversed_provider
    try:
        assert torch.equal(model(ids), want)
        assert torch.equal(model(ids[:, :1]), want_step)
    finally:
        for b in blocks:
            b.provider = original
