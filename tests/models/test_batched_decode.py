"""Sequences decoded together, each at its own position (models/rows.py), against each
decoded alone: step by step the same fp32 logits (within 1e-4) and the same greedy tokens.

Three prompts of different lengths; two start together, the third joins the running
batch three steps later, and the last steps run the third alone (a batch of one row).
The configs cover every attention kind: sliding windows shorter than the sequences,
chunked attention and NoPE layers with temperature tuning (Llama 4), attention sinks
(gpt-oss), multi-head latent attention in both its absorbed and expanded forms
(DeepSeek-V3), LongRoPE switching tables past its original context (Phi-3.5-MoE), q/k
norms before and after RoPE, clip_qkv, output gates, partial RoPE and routed query/output
projections (JetMoE).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from edgemoe.batching import decode_rows
from edgemoe.checkpoint import load_hf
from edgemoe.generate import PromptCache
from edgemoe.models.mla import MLAttention
from edgemoe.batching import supports_rows
from edgemoe.models.rows import row_caches

from models import parity
from models.families import (test_afmoe, test_cohere2_moe, test_deepseek_v3, test_exaone_moe, test_gemma4,
                             test_gpt_oss, test_hunyuan_v1_moe, test_jetmoe, test_llama4, test_minimax_m2,
                             test_phimoe)
from models.test_families import CONFIGS as BASE_CONFIGS

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

ATOL = 1e-4
PROMPTS = (5, 9, 13)  # prompt lengths; the windows (4-8) and Llama 4's chunks (8) are crossed
STEPS = 12  # tokens decoded per sequence
JOIN = (0, 0, 3)  # the step at which each sequence joins the batch

CASES = {name: (lambda f=family, o=overrides: tiny_config(f, **o))
         for name, (family, overrides) in BASE_CONFIGS.items()
         if name in ("mixtral-window-linear", "qwen3-odd-window-bias", "qwen2-gqa4-window-yarn", "olmoe-clip")}
for module, names in ((test_llama4, ("llama4-scout", "llama4-maverick")),
                      (test_gpt_oss, ("gpt_oss-sliding-yarn", "gpt_oss-mha-tied")),
                      (test_deepseek_v3, ("deepseek_v3-grouped-interleaved", "deepseek_v3-moonlight-half-rope")),
                      (test_phimoe, ("phimoe-gqa4-jitter-longrope-long",)),
                      (test_hunyuan_v1_moe, ("hunyuan_v1_moe-top3-gqa4-linear",)),
                      (test_exaone_moe, ("exaone_moe-hybrid-groups",)),
                      (test_afmoe, ("afmoe-hybrid-mup-bias",)),
                      (test_minimax_m2, ("minimax_m2-rotary-dim",)),
                      (test_jetmoe, ("jetmoe-kv2-top2-tied",)),  # routed query/output projections
                      (test_cohere2_moe, ("cohere2_moe-dense1-average-bias",)),  # parallel blocks, 3:1 windows
                      (test_gemma4, ("gemma4-text-bias-untied",))):
    for name in names:
        CASES[name] = module.CONFIGS[name]

# Families whose attention has its own forward without the per-row path: the scheduler
# decodes their rows one forward each (batching.decode_rows), which must still match.
NO_ROWS = {"gemma4-text-bias-untied"}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name)
    parity.save(CASES[name](), out)
    model, _ = load_hf(out)
    return name, model


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (n,), generator=g) for n in PROMPTS]


@torch.no_grad()
def alone(model, prompt: torch.Tensor, capacity: int | None) -> list[torch.Tensor]:
    """Greedy decoding of one sequence: the logits (V,) each token was chosen from."""
    cache = model.make_cache(capacity)
    logits = model(prompt[None], cache)[0, -1]
    seen = []
    for _ in range(STEPS):
        seen.append(logits)
        logits = model(torch.tensor([[int(logits.argmax())]]), cache)[0, -1]
    return seen


@torch.no_grad()
def together(model, prompts: list[torch.Tensor], capacities: list[int | None], step) -> list[list[torch.Tensor]]:
    """Greedy decoding of every prompt, sequence i joining at step JOIN[i]; `step(tokens,
    caches)` runs one batched decode step and returns the logits (B, V)."""
    caches: list = [None] * len(prompts)
    logits: list = [None] * len(prompts)
    seen: list[list[torch.Tensor]] = [[] for _ in prompts]
    t = 0
    while any(len(s) < STEPS for s in seen):
        for i, p in enumerate(prompts):
            if JOIN[i] == t:  # prefilled alone, as the scheduler does
                caches[i] = model.make_cache(capacities[i])
                logits[i] = model(p[None], caches[i])[0, -1]
        rows = [i for i in range(len(prompts)) if caches[i] is not None and len(seen[i]) < STEPS]
        for i in rows:
            seen[i].append(logits[i])
        rows = [i for i in rows if len(seen[i]) < STEPS]  # a sequence's last token is never fed
        if rows:
            out = step([int(logits[i].argmax()) for i in rows], [caches[i] for i in rows])
            for b, i in enumerate(rows):
                logits[i] = out[b]
        t += 1
    return seen


def rows_step(model):
    def step(tokens, caches):
        return model(torch.tensor(tokens)[:, None], row_caches(caches))[:, -1]  # (B, V)
    return step


def check(model, got: list[list[torch.Tensor]], capacities) -> None:
    for i, p in enumerate(prompts(model.args.vocab_size)):
        want = alone(model, p, capacities[i])
        assert [int(x.argmax()) for x in got[i]] == [int(x.argmax()) for x in want], f"sequence {i}: greedy tokens"
        for n, (a, b) in enumerate(zip(got[i], want)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"sequence {i}, step {n}: {m}")


def test_rows_match_each_sequence_alone(case):
    name, model = case
    assert supports_rows(model) == (name not in NO_ROWS)
    if name in NO_ROWS:
        pytest.skip("decoded row by row; see test_scheduler_step_matches_alone")
    capacities = [None, 64, 40]  # growing and fixed-capacity caches side by side
    check(model, together(model, prompts(model.args.vocab_size), capacities, rows_step(model)), capacities)


def test_scheduler_step_matches_alone(case):
    """batching.decode_rows (what the scheduler runs): one forward of rows where the
    family supports it, one forward per row where it does not."""
    name, model = case
    capacities = [64, 64, 64]

    def step(tokens, caches):
        return decode_rows(model, tokens, [PromptCache(model, 64, layers=c) for c in caches])

    check(model, together(model, prompts(model.args.vocab_size), capacities, step), capacities)


def test_mla_rows_both_paths(case):
    """MLA attends through the absorbed path at decode; the expanded one must take rows too."""
    name, model = case
    layers = [layer.attn for layer in model.layers if isinstance(layer.attn, MLAttention)]
    if not layers:
        pytest.skip("not an MLA family")
    capacities = [None, 64, 40]
    try:
        for attn in layers:
            attn.absorb = False
        got = together(model, prompts(model.args.vocab_size), capacities, rows_step(model))
    finally:
        for attn in layers:
            attn.absorb = None
    check(model, got, capacities)
