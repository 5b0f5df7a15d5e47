"""`edgemoe merge`: fold similar experts of every MoE layer into shared "super experts"
(Edge-MoE survey: expert merging; after MC-SMoE), writing a model directory every command
and transformers load."""

from __future__ import annotations

import argparse

from .compress_common import add_common, prepare, show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe merge",
                                description="Group each layer's experts around its most used ones by output "
                                            "similarity and replace every group by its frequency-weighted average "
                                            "(hidden units aligned first). The router still picks among the "
                                            "original ids; convert stores each group once.")
    add_common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--experts-per-layer", type=int, default=None, metavar="N",
                   help="distinct experts each layer keeps")
    g.add_argument("--target-size", default=None, metavar="SIZE",
                   help="largest total of distinct expert bytes after merging, e.g. 300MB")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import InvalidArgument
    from ..utils import format_bytes, parse_size

    if args.experts_per_layer is not None and args.experts_per_layer < 1:
        raise InvalidArgument(f"--experts-per-layer must be at least 1, got {args.experts_per_layer}")
    target = parse_size(args.target_size) if args.target_size is not None else None
    prepare(args)
    from ..compress.merge import merge

    r = merge(args.model, args.output, experts_per_layer=args.experts_per_layer, target_bytes=target,
              calib=args.calib, calib_tokens=args.calib_tokens, context=args.context)
    n, b = r["experts_per_layer"], r["expert_bytes"]
    show(r, args.json, [
        f"merged {n['before']} experts per layer into {n['distinct_after']}: distinct expert bytes "
        f"{format_bytes(b['before'])} -> {format_bytes(b['after_shared'])}",
        *(f"  layer {k}: " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups)
          for k, groups in r["groups"].items()),
        f"wrote {args.output}",
    ])
    return 0
