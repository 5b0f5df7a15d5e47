"""`edgemoe activity TRACE.npz -o activity.png`: plot expert activity from a routing trace
(recorded by `edgemoe trace` or `edgemoe generate --record-trace`)."""

from __future__ import annotations

import argparse
import json

from .common import check_output_path, eprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe activity",
                                description="Plot expert activity (activation share, routing raster, cross-layer "
                                            "paths) from a routing trace.")
    p.add_argument("trace", metavar="TRACE.npz", help="routing trace from 'edgemoe trace' or 'generate --record-trace'")
    p.add_argument("--output", "-o", default=None, metavar="PNG", help="image to write (default: TRACE with .png)")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the routing raster (default 64)")
    p.add_argument("--json", action="store_true", help="print the numbers (shares, entropy, path skew) as JSON")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from ..errors import InvalidArgument
    from ..expert_activity import activity_plot, activity_summary
    from ..runtime.trace import RoutingTrace

    if args.tokens < 1:
        raise InvalidArgument("--tokens must be at least 1")
    out = Path(args.output) if args.output else Path(args.trace).with_suffix(".png")
    check_output_path(out, "-o")
    trace = RoutingTrace.load(args.trace)
    summary = activity_summary(trace)
    why_not = activity_plot(trace, out, args.tokens)
    summary["png"] = None if why_not else str(out)
    if args.json:
        print(json.dumps(summary))
    ent = ", ".join(f"{e:.2f}" for e in summary["entropy_bits"])
    eprint(f"{summary['tokens']} tokens, {len(summary['moe_layers'])} MoE layers x top-{summary['top_k']} of "
           f"{summary['num_experts']}; usage entropy per layer (bits, max {summary['max_entropy_bits']:.2f}): {ent}")
    if summary["top20_path_share"]:
        eprint(f"top 20% of cross-layer expert paths cover {100 * max(summary['top20_path_share']):.1f}% of "
               f"activations at best (paper: >99% on real models)")
    eprint(why_not or f"wrote {out}")
    return 0
