"""`edgemoe prune`: drop the least important experts of every MoE layer (Edge-MoE
survey: expert pruning), writing a model directory every command and transformers load."""

from __future__ import annotations

import argparse

from .compress_common import add_common, prepare, show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe prune",
                                description="Remove the least important experts of every MoE layer (importance: "
                                            "routing frequency x output size on calibration text) and their router "
                                            "rows; tokens route among the rest.")
    add_common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--drop", type=float, default=None, metavar="FRACTION",
                   help="share of each layer's experts to remove, e.g. 0.25")
    g.add_argument("--target-size", default=None, metavar="SIZE",
                   help="largest total of expert bytes after pruning, e.g. 300MB")
    p.add_argument("--per-layer", action="store_true",
                   help="rank experts over all layers, so that layers keep different numbers of them (default: the "
                        "same share of every layer). The output pads the smaller layers with unroutable slots; "
                        "edgemoe runs it exactly, transformers only for routers with a gate or correction bias")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import InvalidArgument
    from ..utils import format_bytes, parse_size

    if args.drop is not None and not 0 < args.drop < 1:
        raise InvalidArgument(f"--drop must be in (0, 1), got {args.drop}")
    target = parse_size(args.target_size) if args.target_size is not None else None
    prepare(args)
    from ..compress.prune import prune

    r = prune(args.model, args.output, drop=args.drop, target_bytes=target, calib=args.calib,
              calib_tokens=args.calib_tokens, context=args.context, per_layer=args.per_layer)
    n = r["experts_per_layer"]
    b = r["expert_bytes"]
    after = (n["after"] if isinstance(n["after"], int)
             else "(" + ", ".join(f"layer {k}: {v}" for k, v in n["after"].items()) + ")")
    show(r, args.json, [
        f"kept {after} of {n['before']} experts per layer: expert bytes {format_bytes(b['before'])} -> "
        f"{format_bytes(b['after'])}",
        "share of importance removed per layer: " + ", ".join(f"{k}: {v:.1%}" for k, v in
                                                                r["importance_removed"].items()),
        f"wrote {args.output}",
    ])
    return 0
