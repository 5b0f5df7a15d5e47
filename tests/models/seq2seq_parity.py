"""Checks every encoder-decoder family must pass against transformers (the seq2seq
counterpart of parity.py, which builds causal LMs).

A family test module lists its tiny configs in SEQ2SEQ_CONFIGS (not CONFIGS, which
test_family_parity.py would build as decoder-only models); tests/test_seq2seq.py builds
each with transformers' classes, saves it, loads it with edgemoe and runs these checks.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

import models.families as families_pkg

ATOL = 1e-4
SRC, TGT = 20, 12


def all_configs() -> dict[str, tuple[ModuleType, Callable]]:
    """config name -> (family test module, config factory) over every family module's
    SEQ2SEQ_CONFIGS. A module may also define GAIN (for `save`) and `reference_patch()`,
    a context manager under which transformers computes the reference."""
    out = {}
    for info in pkgutil.iter_modules(families_pkg.__path__):
        if info.name.startswith("test_"):
            mod = importlib.import_module(f"models.families.{info.name}")
            for name, factory in getattr(mod, "SEQ2SEQ_CONFIGS", {}).items():
                if name in out:
                    raise ValueError(f"config name {name!r} defined twice")
                out[name] = (mod, factory)
    return out


def reference(mod: ModuleType):
    """The family's context for running transformers (its reference_patch, or none)."""
    return getattr(mod, "reference_patch", contextlib.nullcontext)()


def ids(vocab: int, n: int, seed: int, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (1, n), generator=g)  # (1, n): no bos/eos/pad ids


def save(config, out: Path, seed: int = 0, gain: float = 1.0):
    """A random transformers model, saved with save_pretrained. Weights are drawn again
    with std gain/sqrt(fan_in) (norm weights near 1, small biases): the families' own
    inits give tiny models that repeat one token, which would test little."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForSeq2SeqLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    return model


@torch.no_grad()
def routed(model, fn) -> dict[int, torch.Tensor]:
    """layer -> routed ids (N, k) of the MoE blocks that ran during fn()."""
    seen = {}
    blocks = list(model.moe_blocks())
    for b in blocks:
        b.hook = lambda layer, i, w, lg: seen.__setitem__(layer, i)
    try:
        fn()
    finally:
        for b in blocks:
            b.hook = None
    return seen


@torch.no_grad()
def check_forward(hf, model, atol: float = ATOL) -> None:
    """Encoder output and decoder logits of a full forward equal transformers'."""
    src, tgt = ids(model.args.vocab_size, SRC, 1), ids(model.args.vocab_size, TGT, 2)
    want = hf(input_ids=src, decoder_input_ids=tgt)
    torch.testing.assert_close(model.encode(src), want.encoder_last_hidden_state, atol=atol, rtol=0)
    got = model(src, tgt)
    torch.testing.assert_close(got, want.logits, atol=atol, rtol=0)
    torch.testing.assert_close(model(src, tgt, last_only=True), got[:, -1:], atol=atol, rtol=0)


def _first_drop(seen: dict[int, torch.Tensor], layers: set[int], n: int) -> int:
    """The first token position any of `layers` dropped from a slot (n: none)."""
    rows = [torch.nonzero((i < 0).any(dim=1)).flatten() for layer, i in seen.items() if layer in layers]
    return min([int(r[0]) for r in rows if len(r)], default=n)


@contextlib.contextmanager
def unlimited_capacity(model):
    """Every router of `model` with room for every token (restored afterwards)."""
    saved = [(r, r.capacity, getattr(r, "eval_fraction", None)) for r in (b.router for b in model.moe_blocks())]
    for r, _, frac in saved:
        r.capacity = 1 << 30
        if frac is not None:
            r.eval_fraction = -1.0
    try:
        yield
    finally:
        for r, cap, frac in saved:
            r.capacity = cap
            if frac is not None:
                r.eval_fraction = frac


@torch.no_grad()
def _incremental(model, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(cached logits, full logits, positions before the first capacity drop of either)."""
    memory = model.encode(src)
    dec_layers = {layer for layer in model.args.moe_layers() if layer >= model.args.num_hidden_layers}
    out = {}

    def full():
        out["full"] = model.decode(tgt, memory=memory)

    def chunk():
        cache = out["cache"] = model.make_cache()
        model.start(cache, memory)
        out["chunk"] = model.decode(tgt[:, :3], cache)

    first = min(_first_drop(routed(model, full), dec_layers, TGT), _first_drop(routed(model, chunk), dec_layers, TGT))
    steps = [out["chunk"]] + [model.decode(tgt[:, t : t + 1], out["cache"]) for t in range(3, tgt.shape[1])]
    return torch.cat(steps, dim=1), out["full"], first


def check_incremental(model, atol: float = ATOL) -> int:
    """A cached decode (a 3-token chunk, then one token at a time) equals the full decoder
    forward: with every expert's capacity lifted, at every position; with the real
    capacity, up to the first target token either run drops from a slot (a one-token step
    never drops; a full forward may, even at its first token: NLLB's top-2 slots queue
    behind every top-1 slot). Returns how many positions the real capacity left equal."""
    src, tgt = ids(model.args.vocab_size, SRC, 3), ids(model.args.vocab_size, TGT, 4)
    with unlimited_capacity(model):
        steps, full, first = _incremental(model, src, tgt)
    assert first == TGT
    torch.testing.assert_close(steps, full, atol=atol, rtol=0)
    steps, full, first = _incremental(model, src, tgt)
    torch.testing.assert_close(steps[:, :first], full[:, :first], atol=atol, rtol=0)
    return first


@torch.no_grad()
def check_greedy(hf, model, n: int = 32, prompt: list[int] | None = None) -> list[int]:
    """n greedy tokens equal transformers' generate from the same decoder start (and
    `prompt`, a decoder prompt, when given)."""
    from edgemoe.seq2seq import generate_step

    src = ids(model.args.vocab_size, 9, 5)
    hf.generation_config.eos_token_id = None  # pure greedy on both sides
    kw = {"decoder_input_ids": torch.tensor([prompt])} if prompt else {}
    start = len(prompt) if prompt else 1
    want = hf.generate(src, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       decoder_start_token_id=model.args.decoder_start_token_id, **kw)[0, start:].tolist()
    got = list(generate_step(model, src[0].tolist(), max_tokens=n, decoder_prompt=prompt))
    assert got == want
    return got
