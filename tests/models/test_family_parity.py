"""Every config of every family module under tests/models/families against transformers
on the same tiny random weights (fp32 logits, cached decode, greedy generation), and the
offloaded runtime against the in-RAM engine (identical greedy tokens under the smallest
budget, with preloading)."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from edgemoe.checkpoint import load_hf

from models import parity
from store.helpers import PROMPTS, make_converted, min_budget, run_prompts

CONFIGS = parity.all_configs()

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory, tokenizer_dir):
    name = request.param
    out = tmp_path_factory.mktemp(name)
    hf = parity.save(CONFIGS[name][1](), out, tokenizer_dir)
    model, _ = load_hf(out)
    return name, hf, model, out


def test_logits_match_transformers(case):
    _, hf, model, _ = case
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    parity.check_logits(hf, model)


def test_cached_decode_matches_full_forward(case):
    parity.check_incremental(case[2])


def test_greedy_matches_transformers_generate(case):
    _, hf, model, _ = case
    parity.check_greedy(hf, model)


def test_offloaded_tokens_match_in_ram(case, tmp_path):
    _, _, _, hf_dir = case
    ref_engine = edgemoe.load(hf_dir)
    try:
        ref = run_prompts(ref_engine)
    finally:
        ref_engine.close()
    conv = make_converted(hf_dir, tmp_path / "conv")
    for memory, extra in ((min_budget(conv), {"prefetch": True}), (None, {"prefetch": False})):
        engine = edgemoe.load(conv, memory=memory, **extra)
        try:
            assert run_prompts(engine, PROMPTS) == ref, (memory, extra)
        finally:
            engine.close()
