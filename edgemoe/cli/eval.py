"""`edgemoe eval`: perplexity of a model on held-out text (the bundled held-out text by
default), for a Hugging Face directory or a converted one under any runtime options."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..errors import InvalidArgument, ModelLoadError
from ..utils import format_bytes
from .common import add_model_args, eprint, load_engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe eval",
        description="Perplexity on a text, in non-overlapping windows of the model's context (every token but the "
                    "first of each window is predicted once), computed in float32 unless --dtype says otherwise. "
                    "Compare models by their relative perplexity increase.",
    )
    add_model_args(p)
    p.add_argument("--text", default=None, metavar="FILE", help="text to evaluate on (default: the bundled held-out text)")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="evaluate at most N predicted tokens, in whole windows (default: the whole text)")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="Hugging Face directories only: apply a bitwidth plan in RAM (each expert quantized to its "
                        "planned format) instead of converting first")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: ppl, nll, tokens, expert_bytes, bits_per_byte, ...")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .. import assets
    from ..evaluate import check_decoder_only, eval_tokens, perplexity, read_text

    for flag, v in (("--batch", args.batch), ("--context", args.context)):
        if v is not None and v < 1:
            raise InvalidArgument(f"{flag} must be at least 1, got {v}")
    text_path = Path(args.text) if args.text else assets.HELDOUT_TEXT
    text = read_text(text_path, "evaluation text")
    if args.dtype is None:
        args.dtype = "float32"  # quality numbers in float32, like docs/bundled-model.md
    t0 = time.perf_counter()
    engine = _load(args)
    with engine:
        model = engine.model
        check_decoder_only(model, "eval", engine.path)
        context = args.context or model.args.max_position_embeddings
        ids = eval_tokens(engine.tokenizer, text, context, args.max_tokens, str(text_path))
        if engine.provider is not None:
            engine.provider.reset_stats()
        t1 = time.perf_counter()
        r = perplexity(model, ids, context, batch=args.batch, progress=not args.quiet and sys.stderr.isatty())
        secs = time.perf_counter() - t1
        n = r["tokens"]
        predicted = engine.tokenizer.decode(ids[1 : n + 1], skip_special_tokens=False).encode("utf-8")
        result = {
            "ppl": r["ppl"],
            "nll": r["nll"],
            "tokens": n,
            "windows": n // context,
            "context": context,
            "bits_per_byte": r["nll"] * n / math.log(2) / max(len(predicted), 1),
            "expert_bytes": engine.info["expert_bytes"],
            "model": str(engine.path),
            "kind": engine.info.get("kind"),
            "dtype": engine.info.get("dtype"),
            "text": str(text_path),
            "seconds": round(secs, 3),
            "load_seconds": round(t1 - t0, 3),
            "tokens_per_s": round(n / secs, 1) if secs > 0 else None,
        }
        for key in ("formats", "resident_bytes", "resident_int8", "plan"):
            if key in engine.info:
                result[key] = engine.info[key]
        if engine.provider is not None and engine.provider.stats():
            result["runtime"] = engine.provider.stats()
    if args.json:
        print(json.dumps(result))
        return 0
    eprint(f"perplexity {result['ppl']:.4f} ({result['bits_per_byte']:.4f} bits/byte) on {n:,} tokens of "
           f"{text_path.name} ({result['windows']} windows of {context}, {result['dtype']})")
    formats = result.get("formats")
    fmt = f" ({', '.join(f'{f} x{c}' for f, c in sorted(formats.items()))})" if formats else ""
    eprint(f"experts stored: {format_bytes(result['expert_bytes'])} ({result['expert_bytes']} bytes){fmt}")
    eprint(f"{secs:.1f} s, {result['tokens_per_s']} tokens/s")
    return 0


def _load(args):
    """The engine for MODEL, with its experts' stored bytes in info['expert_bytes']."""
    from ..api import Engine, default_model_dir
    from ..store.manifest import is_converted

    from ..hub import resolve_model

    path = resolve_model(args.model) if args.model else default_model_dir()
    converted = is_converted(path)
    if args.plan is not None:
        if converted:
            raise InvalidArgument(f"{path}: --plan applies to Hugging Face directories; a converted model already "
                                  "has its formats")
        if args.memory is not None or any(getattr(args, k, None) for k in ("mode", "cache_policy", "trace", "verify")):
            raise ModelLoadError(f"{path}: memory budgets and runtime options need a converted model")
        from ..api import set_threads
        from ..bitwidth.apply import load_planned, planned_bytes
        from ..tokenizer import Tokenizer

        model, ckpt, formats = load_planned(path, args.plan, args.dtype)
        set_threads(getattr(args, "threads", None), model)
        counts: dict[str, int] = {}
        for f in formats.values():
            counts[f] = counts.get(f, 0) + 1
        info = {"kind": "hf+plan", "dtype": args.dtype, "plan": str(args.plan), "formats": counts,
                "expert_bytes": planned_bytes(model, ckpt, formats)}
        tokenizer = Tokenizer(path, eos_token_ids=model.args.eos_ids)
        tokenizer.check_vocab(model.args.vocab_size, str(path / "config.json"))
        return Engine(model, tokenizer, path, info)
    args.model = str(path)
    engine = load_engine(args)
    if "expert_bytes" not in engine.info:
        from ..checkpoint import HFCheckpoint
        from ..evaluate import checkpoint_expert_bytes

        engine.info["expert_bytes"] = checkpoint_expert_bytes(HFCheckpoint(path))
    return engine
