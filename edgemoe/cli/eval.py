"""`edgemoe eval`: perplexity of a model on held-out text (the bundled held-out text by
default), for a Hugging Face directory or a converted one under any runtime options.

An encoder-decoder model (Switch Transformers, NLLB-MoE) gets a seq2seq loss instead: the
text, tokenized as a whole, is cut into non-overlapping windows of --context tokens, and
each window into a source (its first half, context // 2 tokens) and a target (the rest);
the loss is the teacher-forced NLL per target token given the source (edgemoe.seq2seq
text_pairs and pair_loss), and "tokens" counts target tokens."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..errors import InvalidArgument
from ..utils import format_bytes
from .common import add_model_args, eprint, load_engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe eval",
        description="Perplexity on a text, in non-overlapping windows of the model's context (every token but the "
                    "first of each window is predicted once), computed in float32 unless --dtype says otherwise. "
                    "Compare models by their relative perplexity increase. Encoder-decoder models (Switch "
                    "Transformers, NLLB-MoE): each window's first half is the source, the rest the target, and the "
                    "perplexity is the target tokens' given the source.",
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
    from ..evaluate import eval_tokens, perplexity, read_text
    from ..seq2seq import is_seq2seq, pair_loss, text_pairs

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
        context = args.context or model.args.max_position_embeddings
        ids = eval_tokens(engine.tokenizer, text, context, args.max_tokens, str(text_path))
        if engine.provider is not None:
            engine.provider.reset_stats()
        t1 = time.perf_counter()
        progress = not args.quiet and sys.stderr.isatty()
        if is_seq2seq(model):  # a target given a source: the windows split in half
            sources, targets = text_pairs(ids, context)
            r = pair_loss(model, sources, targets, batch=args.batch, progress=progress)
            windows = sources.shape[0]
            predicted = "".join(engine.tokenizer.decode(t, skip_special_tokens=False) for t in targets.tolist())
        else:
            r = perplexity(model, ids, context, batch=args.batch, progress=progress)
            windows = r["tokens"] // context
            predicted = engine.tokenizer.decode(ids[1 : r["tokens"] + 1], skip_special_tokens=False)
        secs = time.perf_counter() - t1
        n = r["tokens"]
        predicted = predicted.encode("utf-8")
        result = {
            "ppl": r["ppl"],
            "nll": r["nll"],
            "tokens": n,
            "windows": windows,
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
        if is_seq2seq(model):
            result["loss"] = "seq2seq"  # per target token; windows split into source and target halves
            result["source_tokens"] = context // 2
        for key in ("formats", "resident_bytes", "resident_int8", "plan"):
            if key in engine.info:
                result[key] = engine.info[key]
        stats = engine.provider.stats() if engine.provider is not None else {}
        if stats:
            result["runtime"] = dict(stats)  # the JSON content of the typed statistics
    if args.json:
        print(json.dumps(result))
        return 0
    what = (f"{result['windows']} windows of {context}: {context // 2}-token sources, targets scored"
            if "loss" in result else f"{result['windows']} windows of {context}")
    eprint(f"perplexity {result['ppl']:.4f} ({result['bits_per_byte']:.4f} bits/byte) on {n:,} "
           f"{'target ' if 'loss' in result else ''}tokens of {text_path.name} ({what}, {result['dtype']})")
    formats = result.get("formats")
    fmt = f" ({', '.join(f'{f} x{c}' for f, c in sorted(formats.items()))})" if formats else ""
    eprint(f"experts stored: {format_bytes(result['expert_bytes'])} ({result['expert_bytes']} bytes){fmt}")
    eprint(f"{secs:.1f} s, {result['tokens_per_s']} tokens/s")
    return 0


def _load(args):
    """The engine for MODEL (with --plan, its experts quantized in RAM as planned), with
    its experts' stored bytes in info['expert_bytes']."""
    engine = load_engine(args)
    if "expert_bytes" not in engine.info:
        from ..checkpoint import HFCheckpoint
        from ..evaluate import checkpoint_expert_bytes

        engine.info["expert_bytes"] = checkpoint_expert_bytes(HFCheckpoint(engine.path))
    return engine
