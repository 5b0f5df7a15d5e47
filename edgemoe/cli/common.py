"""Options and helpers shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import sys

from ..api import Engine, load
from ..errors import InvalidArgument
from ..generate import GenerationStats
from ..utils import format_bytes


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory or a directory from 'edgemoe convert' (default: the bundled model)")
    p.add_argument("--dtype", default=None, help="compute dtype: auto (default), float32, bfloat16")
    p.add_argument("--memory", default=None,
                   help="memory budget for resident weights + expert cache, e.g. 800MB, 1.5GB (converted models)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="maximum tokens to generate (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    if args.max_tokens < 1:
        raise InvalidArgument("--max-tokens must be at least 1")
    return dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """Options for the offloaded runtime; subcommands add more flags over time."""
    return {}


def load_engine(args: argparse.Namespace) -> Engine:
    return load(args.model, dtype=args.dtype, memory=args.memory, **runtime_kwargs(args))


def format_stats(stats: GenerationStats) -> str:
    """Human summary printed after generation."""
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"decode: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tok/s | "
        f"peak RSS: {format_bytes(stats.peak_rss_bytes)}"
    ]
    extra = stats.extra
    if extra:
        lines.append(" | ".join(f"{k}: {_fmt(k, v)}" for k, v in extra.items() if not isinstance(v, (dict, list))))
    return "\n".join(lines)


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and key.endswith("bytes"):
        return format_bytes(value)
    return str(value)


def eprint(*a, **k) -> None:
    print(*a, file=sys.stderr, **k)
