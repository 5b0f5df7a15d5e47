"""Checks every family must pass against transformers, shared by the family tests.

A family test module (tests/models/families/test_<family>.py) lists tiny configs in
CONFIGS; test_family_parity.py builds each with transformers' own classes, saves it with
save_pretrained and loads it with edgemoe, then runs the checks below.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

import torch

import models.families as families_pkg

ATOL = 1e-4
SEQ = 20  # longer than the sliding windows the configs use


def all_configs() -> dict[str, tuple[str, Callable]]:
    """config name -> (family test module name, config factory) over every family module."""
    out = {}
    for info in pkgutil.iter_modules(families_pkg.__path__):
        if not info.name.startswith("test_"):
            continue
        mod = importlib.import_module(f"models.families.{info.name}")
        for name, factory in getattr(mod, "CONFIGS", {}).items():
            if name in out:
                raise ValueError(f"config name {name!r} defined twice")
            out[name] = (info.name, factory)
    return out


def prompt_ids(vocab: int, n: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, n), generator=g)  # skip bos/eos ids


# Tensors transformers initialises to zeros that decide routing: the load-balancing
# correction biases (used only to choose) and zero-initialised router weights (AFMoE).
# Left at zero, routing would not exercise them.
_ZERO_ROUTING = ("e_score_correction_bias", "expert_bias")


def save(config, out: Path, tokenizer_dir: Path | None = None, seed: int = 0, dtype=torch.float32):
    """Random weights with routers wide enough to discriminate (init std 0.1), routing
    biases and zero-initialised router weights randomised too, saved with save_pretrained."""
    import shutil

    import transformers as tf

    torch.manual_seed(seed)
    config.initializer_range = 0.1
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(_ZERO_ROUTING) or (".gate." in f".{name}" and name.endswith("weight")
                                                 and t.dim() == 2 and not t.any()):
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if name.endswith(_ZERO_ROUTING) else 0.3))
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
    return model


@torch.no_grad()
def check_logits(hf, model, atol: float = ATOL) -> None:
    ids = prompt_ids(model.args.vocab_size, batch=2)
    want = hf(ids).logits  # (2, T, V)
    got = model(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    torch.testing.assert_close(model(ids, last_only=True), got[:, -1:], atol=atol, rtol=0)


@torch.no_grad()
def check_incremental(model, atol: float = ATOL) -> None:
    """Prefill then one token at a time, and a two-chunk prefill, equal the full forward."""
    ids = prompt_ids(model.args.vocab_size, seed=3)
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache) for t in range(5, SEQ)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=atol, rtol=0)
    cache = model.make_cache()
    parts = [model(ids[:, :7], cache), model(ids[:, 7:16], cache)]
    parts += [model(ids[:, t : t + 1], cache) for t in range(16, SEQ)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=atol, rtol=0)


@torch.no_grad()
def check_greedy(hf, model, n: int = 32) -> None:
    from edgemoe.generate import generate_step

    prompt = prompt_ids(model.args.vocab_size, n=6, seed=5)
    hf.generation_config.eos_token_id = None  # pure greedy on both sides
    want = hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, 6:].tolist()
    got = list(generate_step(model, prompt[0].tolist(), max_tokens=n))
    assert got == want


@torch.no_grad()
def routed_layers(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """layer -> (ids, weights, logits) of every MoE block on one forward."""
    seen = {}
    blocks = list(model.moe_blocks())
    for b in blocks:
        b.hook = lambda layer, i, w, lg: seen.__setitem__(layer, (i, w, lg))
    try:
        model(ids)
    finally:
        for b in blocks:
            b.hook = None
    return seen


def hf_routing(hf, routers: list, ids: torch.Tensor) -> list:
    """What each of transformers' router modules returns on one forward of `ids`."""
    out = [None] * len(routers)
    handles = [r.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return out


def check_routing(hf, model, routers: list) -> list:
    """Our router logits, chosen experts (as sets) and their weights equal transformers'
    on every MoE layer, for routers returning (logits, top-k weights, top-k ids); returns
    transformers' outputs per MoE layer."""
    ids = prompt_ids(model.args.vocab_size, seed=2)
    ours = routed_layers(model, ids)
    theirs = hf_routing(hf, routers, ids)
    assert sorted(ours) == model.args.moe_layers()
    for layer, (want_logits, want_w, want_ids) in zip(sorted(ours), theirs, strict=True):
        got_ids, got_w, got_logits = ours[layer]
        torch.testing.assert_close(got_logits.float(), want_logits.float(), atol=1e-5, rtol=0)
        got_ids, order = got_ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        assert torch.equal(got_ids, want_ids), layer
        torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), atol=1e-5, rtol=0)
    return theirs
