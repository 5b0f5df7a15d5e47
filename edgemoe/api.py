"""Python API: `edgemoe.load(path)` returns an `Engine` with `generate` and `stream`.

    >>> import edgemoe
    >>> engine = edgemoe.load()                      # the bundled model, all in RAM
    >>> print(engine.generate("def add(a, b):", max_tokens=32).text)
    >>> engine = edgemoe.load("out/", memory="300MB")  # a converted model, experts offloaded
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import InvalidArgument, ModelLoadError
from .generate import GenerationResponse, GenerationStats, PromptCache, provider_of, stream_generate
from .models.base import Transformer
from .models.moe import set_adaptive_gating
from .sample import make_logits_processors, make_sampler
from .tokenizer import Tokenizer

MANIFEST = "manifest.json"
# Any of these marks a directory written by `edgemoe convert` (so that one missing its
# manifest is reported as such, not read as a Hugging Face checkpoint).
CONVERTED_FILES = (MANIFEST, "experts.bin", "resident.safetensors")


def default_model_dir() -> Path:
    from . import assets

    if not Path(assets.MODEL_DIR, "config.json").exists():
        raise ModelLoadError(f"{assets.MODEL_DIR}: the bundled model is missing from this installation")
    return Path(assets.MODEL_DIR)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class Engine:
    """A loaded model with its tokenizer. Obtain one with `edgemoe.load`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path, info: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.info = info or {}  # how it was loaded: kind, dtype, memory budget, ...
        self.on_close: list = []  # callables run by close() (e.g. saving a recorded routing trace)

    @property
    def provider(self):
        return provider_of(self.model)

    def new_cache(self) -> PromptCache:
        """A KV cache that can be passed to successive calls to reuse a shared prefix."""
        return PromptCache(self.model)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cache: PromptCache | None = None,
    ) -> Iterator[GenerationResponse]:
        """Yield responses with text deltas; the last one has finish_reason and stats."""
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        procs = make_logits_processors(repetition_penalty)
        if self.provider is not None:
            self.provider.reset_stats()  # statistics describe this request only
        yield from stream_generate(
            self.model, self.tokenizer, prompt, max_tokens, sampler, procs, stop, ignore_eos, cache
        )

    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        """Generate to completion; same options as `stream`. `token_ids` holds the
        generated ids, without the EOS token that ended generation."""
        parts, ids, last = [], [], None
        for r in self.stream(prompt, **kwargs):
            parts.append(r.text)
            if r.token is not None:
                ids.append(r.token)
            last = r
        return GenerationResult("".join(parts), ids, last.finish_reason, last.stats)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], **kwargs) -> GenerationResult:
        """Generate an assistant reply to a list of {"role", "content"} messages."""
        return self.generate(self.chat_prompt(messages), **kwargs)

    def close(self) -> None:
        callbacks, self.on_close = self.on_close, []
        for fn in callbacks:
            fn()
        if self.provider is not None:
            self.provider.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Below this many weight bytes touched per decoded token, one thread is faster: splitting
# such small matmuls costs more than it saves, and on a busy 2-core machine OpenMP threads
# stall at barriers (measured 5-8x slower decode with 2 threads on the bundled model).
SMALL_MODEL_BYTES = 64 * 1000**2
_DEFAULT_THREADS = torch.get_num_threads()


def decode_bytes_per_token(model: Transformer) -> int:
    """Approximate weight bytes one decode step reads: resident matrices (not the embedding
    lookup, unless it doubles as the LM head) plus top-k routed experts per MoE layer."""
    args = model.args
    params = sum(p.nbytes for p in model.parameters())
    if not args.tie_word_embeddings:
        params -= model.embed.weight.nbytes
    elem = model.embed.weight.element_size()
    expert = 3 * args.hidden_size * args.expert_dim * elem
    return params + len(args.moe_layers()) * args.top_k * expert


def set_threads(threads: int | None, model: Transformer) -> int:
    """Apply a thread count (None: one thread for small models, torch's default otherwise)."""
    if threads is None:
        torch.set_num_threads(1 if decode_bytes_per_token(model) < SMALL_MODEL_BYTES else _DEFAULT_THREADS)
    elif threads < 1:
        raise InvalidArgument(f"threads must be >= 1, got {threads}")
    else:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load(
    path: str | Path | None = None,
    *,
    dtype: str | None = None,
    memory: str | int | None = None,
    threads: int | None = None,
    adaptive_gating: float | None = None,
    **runtime,
) -> Engine:
    """Load a model for generation.

    path: a Hugging Face model directory (everything in RAM) or a directory written by
    `edgemoe convert` (experts offloaded to an expert store). None means the bundled model.
    memory: for converted models, the byte budget for resident weights plus the expert
    cache ("800MB", "1.5GB" or an int); None means unlimited.
    threads: compute threads for this process (torch's setting is process-wide); None picks
    one thread for small models and torch's default (all cores) otherwise.
    adaptive_gating: adaptive top-k gating (Edge-MoE survey): each token keeps its top
    experts only until this share of routing probability (e.g. 0.8), at least one and at
    most top-k; fewer experts computed and read. None keeps plain top-k.
    runtime: options for the offloaded runtime (cache_policy, prefetch, ...).
    """
    path = Path(path) if path is not None else default_model_dir()
    if any((path / name).exists() for name in CONVERTED_FILES):
        from .runtime.engine import load_converted

        model, info = load_converted(path, memory=memory, dtype=dtype, **runtime)
    else:
        if memory is not None or runtime:
            raise ModelLoadError(
                f"{path}: memory budgets and runtime options need a converted model; run 'edgemoe convert {path} OUT_DIR' first"
            )
        from .checkpoint import load_hf

        model, ckpt = load_hf(path, dtype)
        info = {"kind": "hf", "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    try:
        tokenizer = Tokenizer(path, eos_token_ids=model.args.eos_ids)
        info["threads"] = set_threads(threads, model)
        if adaptive_gating is not None:
            set_adaptive_gating(model, adaptive_gating)
            info["adaptive_gating"] = adaptive_gating
    except BaseException:
        provider = provider_of(model)
        if provider is not None:
            provider.close()  # stop loader threads and close the store before giving up
        raise
    return Engine(model, tokenizer, path, info)
