"""`edgemoe profile`: per-expert activation frequency and sensitivity to each storage
format, on calibration text (bitwidth adaptation, step 1)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..errors import InvalidArgument
from .common import check_output_path, eprint


# Copies of bitwidth.profile's defaults: that module imports torch (1-3 s), which would make
# '--help' and argument errors slow. tests/cli/test_startup.py checks that they match.
DEFAULT_FORMATS = ("int8", "int4", "int4-asym", "int3", "int3-asym", "int2", "int2-asym")
DEFAULT_CALIB_TOKENS = 32768
DEFAULT_VALIDATE = 12


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe profile",
        description="Measure how often each expert is routed to and how much calibration loss each candidate "
                    "storage format would cost it (a second-order estimate from one pass, checked against full "
                    "measurements on a sample of experts). Feed the result to 'edgemoe plan'.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.json", help="where to write the profile")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text file (default: the bundled calibration text)")
    p.add_argument("--calib-tokens", default=str(DEFAULT_CALIB_TOKENS), metavar="N",
                   help=f"predicted tokens of calibration text to use, rounded down to whole windows, or 'all' "
                        f"(default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"candidate expert formats to profile (default {','.join(DEFAULT_FORMATS)})")
    p.add_argument("--top", default=None,
                   help="the unquantized format experts start from (default: what 'edgemoe convert' stores without "
                        "a plan: bf16 for half-precision checkpoints, fp32 for fp32 ones)")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--validate", type=int, default=DEFAULT_VALIDATE, metavar="N",
                   help=f"experts whose estimate is checked against a full calibration measurement (default "
                        f"{DEFAULT_VALIDATE}; 0 skips the check)")
    p.add_argument("--validate-formats", default=None, metavar="F1,F2",
                   help="formats of that check (default: the smallest candidate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation sample (default 0)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: torch's choice)")
    p.add_argument("--png", default=None, metavar="FILE", help="heatmap image (default: the output path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the heatmap")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def parse_token_count(text: str, flag: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise InvalidArgument(f"{flag} must be a number of tokens or 'all', got {text!r}") from None
    if n < 1:
        raise InvalidArgument(f"{flag} must be at least 1, got {n}")
    return n


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..bitwidth.plots import profile_heatmap
    from ..bitwidth.profile import parse_formats, run_profile, write_profile

    calib_tokens = parse_token_count(args.calib_tokens, "--calib-tokens")
    formats = parse_formats(args.formats)
    vformats = parse_formats(args.validate_formats) if args.validate_formats else None
    out = Path(args.output)
    if out.is_dir():
        raise InvalidArgument(f"{out}: is a directory; -o takes the profile's file name")
    check_output_path(out, "-o")
    if args.png:
        check_output_path(args.png, "--png")
    from ..api import set_threads

    set_threads(args.threads, name="--threads")
    model = args.model
    if model is not None:
        from ..hub import resolve_model

        model = str(resolve_model(model))
    if model is None:
        from ..api import default_model_dir

        model = default_model_dir()
    profile = run_profile(
        model, args.calib, formats=formats, top=args.top, calib_tokens=calib_tokens, context=args.context,
        batch=args.batch, validate=args.validate, validate_formats=vformats, seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    write_profile(profile, out)
    c = profile["calibration"]
    eprint(f"profiled {len(profile['experts'])} experts x {len(profile['formats'])} formats on {c['tokens']:,} "
           f"calibration tokens ({c['windows']} windows of {c['context']}) in {profile['seconds']['total']:.1f} s")
    top = profile["top_format"]
    lowest = min((f for f in profile["formats"] if f != top), key=lambda f: profile["formats"][f]["bytes"], default=None)
    if lowest:
        worst = sorted(profile["experts"], key=lambda x: -x["sensitivity"][lowest])[:5]
        eprint(f"most sensitive to {lowest} (predicted perplexity increase): "
               + ", ".join(f"L{x['layer']}.E{x['expert']} {100 * math.expm1(x['sensitivity'][lowest]):+.2f}%" for x in worst))
    for v in profile["validation"]:
        if v["spearman"] is None:
            continue
        t = v["taylor"]
        eprint(f"check against {len(v['experts'])} full measurements at {v['format']}: sensitivity rank correlation "
               f"{v['spearman']:.3f} (linear {v['pearson']:.3f}, measured/predicted {v['slope']:.2f}); with the "
               f"first-order term {t['spearman']:.3f} (linear {t['pearson']:.3f}, measured/predicted {t['slope']:.2f})")
    eprint(f"wrote {out}")
    if not args.no_plot:
        png = Path(args.png) if args.png else out.with_suffix(".png")
        reason = profile_heatmap(profile, png)
        eprint(f"wrote {png}" if reason is None else f"note: {reason}")
    return 0
