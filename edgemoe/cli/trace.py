"""`edgemoe trace`: record which experts every token picks, teacher-forced over a text.

The text is tokenized as a whole and cut into windows of the model's context (or
--window); each window is one forward from an empty context, and every token of every
window is recorded: for each MoE layer its top-k experts and their routing weights, plus
the gate look-ahead logits of the next --lookahead MoE layers. The result is a routing
trace (.npz, edgemoe.runtime.trace) that `edgemoe fit-predictor` fits expert predictors
on, and that the belady cache policy and plots can read.

An encoder-decoder model (Switch Transformers, NLLB-MoE) runs the text as `edgemoe eval`
scores it: each window split into a source (its first half) and a target, one encoder
forward over the sources of a batch, then one teacher-forced decoder forward over their
targets. Both stacks' MoE layers are recorded (edgemoe.seq2seq.Seq2SeqTraceRecorder: a
forward's rows hold -1 at the other stack's positions).
"""

from __future__ import annotations

import argparse
import json
import time

from .common import check_output_path, eprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe trace",
        description="Record every token's experts (and gate look-ahead logits) over a text, teacher-forced.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory or a directory from 'edgemoe convert' (default: the bundled model)")
    p.add_argument("--text", action="append", default=None, metavar="FILE",
                   help="UTF-8 text to run over (repeatable; default: the bundled calibration text)")
    p.add_argument("--output", "-o", required=True, metavar="TRACE.npz", help="where to write the routing trace")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward (default: the model's context, at most 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens of text")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--lookahead", type=int, default=2,
                   help="record the gate look-ahead logits of the next N MoE layers (default 2; 0: none)")
    p.add_argument("--dtype", default=None, help="compute dtype: auto (default), float32, bfloat16")
    p.add_argument("--memory", default=None, help="memory budget for a converted model (default: unlimited)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the expert activity (see 'edgemoe activity')")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .. import assets
    from ..api import load
    from ..errors import InvalidArgument
    from ..evaluate import read_text, windows
    from ..runtime.trace import TraceRecorder
    from ..seq2seq import Seq2SeqTraceRecorder, is_seq2seq, pair_loss, text_pairs

    if args.window is not None and args.window < 1:
        raise InvalidArgument("--window must be at least 1")
    if args.batch < 1:
        raise InvalidArgument("--batch must be at least 1")
    if args.lookahead < 0:
        raise InvalidArgument("--lookahead must be 0 or more")
    check_output_path(args.output, "-o")
    if args.plot:
        check_output_path(args.plot, "--plot")
    texts = args.text or [str(assets.CALIB_TEXT)]
    from ..hub import resolve_model

    model_path = resolve_model(args.model) if args.model is not None else None  # a hub id: its local copy
    engine = load(model_path, dtype=args.dtype, memory=args.memory,
                  **({"prefetch": False} if engine_is_converted(model_path) else {}))
    t0 = time.perf_counter()
    with engine:
        model = engine.model
        window = args.window or min(int(getattr(model.args, "max_position_embeddings", 256) or 256), 256)
        seq2seq = is_seq2seq(model)
        recorder = (Seq2SeqTraceRecorder if seq2seq else TraceRecorder)(model, lookahead=args.lookahead)
        provider = engine.provider
        tokens = 0
        with torch.inference_mode():
            for path in texts:
                ids = engine.tokenizer.encode(read_text(path))
                if args.max_tokens is not None:
                    ids = ids[: max(args.max_tokens - tokens, 0) + 1]
                if seq2seq:  # source/target pairs: windows of `window` tokens split in half
                    if len(ids) < window:
                        raise InvalidArgument(f"{path}: {len(ids)} tokens, fewer than one source/target window of "
                                              f"{window} (--window)")
                    sources, targets = text_pairs(ids, window)
                    pair_loss(model, sources, targets, batch=args.batch)  # an encoder, then a decoder forward
                    tokens += sources.numel() + targets.numel()
                    if args.max_tokens is not None and tokens >= args.max_tokens:
                        break
                    continue
                if len(ids) <= window:
                    window_ids = torch.tensor([ids[:-1] or ids])  # one short window
                else:
                    window_ids, _ = windows(ids, window)  # (W, T)
                for i in range(0, window_ids.shape[0], args.batch):
                    x = window_ids[i : i + args.batch]
                    if provider is not None:
                        provider.begin_forward(x.numel())
                    model(x)
                    tokens += x.numel()
                if args.max_tokens is not None and tokens >= args.max_tokens:
                    break
        trace = recorder.save(args.output)
        recorder.detach()
    h = trace.header
    if args.plot:
        from ..expert_activity import activity_plot

        why_not = activity_plot(trace, args.plot)
        eprint(why_not or f"expert activity -> {args.plot}")
    summary = {"output": str(args.output), "tokens": h["tokens"], "forwards": h["forwards"], "window": window,
               "moe_layers": len(h["moe_layers"]), "num_experts": h["num_experts"], "top_k": h["top_k"],
               "lookahead_depth": h["lookahead_depth"], "texts": texts, "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        eprint(f"routing trace: {h['tokens']} tokens in {h['forwards']} forwards of up to {window}, "
               f"{len(h['moe_layers'])} MoE layers x top-{h['top_k']} of {h['num_experts']}, "
               f"look-ahead depth {h['lookahead_depth']} -> {args.output} ({summary['seconds']:.1f} s)")
    return 0


def engine_is_converted(model) -> bool:
    from ..store.manifest import is_converted

    return model is not None and is_converted(model)
