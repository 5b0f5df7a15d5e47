"""`edgemoe plan`: choose each expert's storage format from a profile, for a quality
loss tolerance (--max-loss) or a size budget (--target-size); the plan feeds
`edgemoe convert --plan` (bitwidth adaptation, step 2)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidArgument
from ..utils import format_bytes
from .common import check_output_path, eprint

# Copies of bitwidth.plan.DEFAULT_MAX_EVALS and DEFAULT_HOLDBACK: that module imports torch (1-3 s), which would
# make '--help' and argument errors slow. tests/cli/test_startup.py checks that it matches.
DEFAULT_MAX_EVALS = 10
DEFAULT_HOLDBACK = 0.25
DEFAULT_MARGIN = 0.35


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe plan",
        description="Give each expert its own bitwidth: the least sensitive experts go to the fewest bits first, "
                    "as far as the loss tolerance or the size budget allows. Losses are relative perplexity "
                    "increases on the profile's calibration text, checked by evaluating the model.",
    )
    p.add_argument("profile", metavar="PROFILE.json", help="a profile written by 'edgemoe profile'")
    g = p.add_argument_group("objective (exactly one)")
    g.add_argument("--max-loss", default=None, metavar="P",
                   help="largest calibration perplexity increase, e.g. 2%% or 0.02")
    g.add_argument("--target-size", default=None, metavar="SIZE",
                   help="largest total of stored expert bytes, e.g. 300MB or 2.5MiB (met exactly: <=)")
    g.add_argument("--bytes-per-token", default=None, metavar="SIZE",
                   help="largest expected expert bytes read per decoded token past an expert cache of --cache-size "
                        "(a static cache of the most frequently routed experts; the rest read when routed), e.g. "
                        "200KB")
    p.add_argument("--cache-size", default=None, metavar="SIZE",
                   help="expert cache bytes for --bytes-per-token; with another objective, the plan's expected "
                        "bytes per token at this cache size are reported")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    p.add_argument("--formats", default=None,
                   help="candidate formats, comma-separated (default: every profiled format)")
    p.add_argument("--top", default=None, help="the largest format an expert keeps (default: the profile's, e.g. bf16)")
    p.add_argument("--estimate", choices=("sensitivity", "taylor"), default="sensitivity",
                   help="per-expert loss estimate: sensitivity (default: the expected, second-order increase) or "
                        "taylor (plus the calibration text's first-order term: fits the calibration text closer, "
                        "generalises worse)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="the model to verify with (default: the one named in the profile)")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text to verify on (default: the profile's)")
    p.add_argument("--max-evals", type=int, default=DEFAULT_MAX_EVALS,
                   help=f"most calibration evaluations of the --max-loss search (default {DEFAULT_MAX_EVALS})")
    p.add_argument("--holdback", type=float, default=DEFAULT_HOLDBACK, metavar="FRACTION",
                   help=f"share of the calibration windows the --max-loss search holds back: a plan must stay within "
                        f"the tolerance on both parts (default {DEFAULT_HOLDBACK}; 0: search on all of it)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, metavar="FRACTION",
                   help=f"share of the --max-loss tolerance kept in reserve for text the plan was not chosen on: "
                        f"the search holds the calibration loss to (1 - FRACTION) x the tolerance (default "
                        f"{DEFAULT_MARGIN}, measured on the bundled model's held-out text; 0: the tolerance itself)")
    p.add_argument("--heldout", default=None, metavar="TEXT",
                   help="also measure the chosen plan on this text and report its loss (not used to choose)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not evaluate the model: plan from the profile's predictions alone")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: torch's choice)")
    p.add_argument("--png", default=None, metavar="FILE", help="bit map image (default: the output path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the bit map")
    p.add_argument("--json", action="store_true", help="also print the plan's numbers as one JSON object on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def parse_size_flag(text: str | None, flag: str, zero_ok: bool = False) -> int | None:
    """A size flag's bytes (None when not given); a clear error naming the flag."""
    if text is None:
        return None
    from ..errors import EdgeMoEError
    from ..utils import parse_size

    try:
        n = parse_size(text)
    except EdgeMoEError:
        raise InvalidArgument(f"{flag}: cannot parse size {text!r} (examples: 200KB, 1.5MB, 4096)") from None
    if n < 0 or (n == 0 and not zero_ok):
        raise InvalidArgument(f"{flag} must be {'non-negative' if zero_ok else 'positive'}, got {text!r}")
    return n


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..bitwidth.plan import make_plan, parse_loss, parse_target_size
    from ..bitwidth.plots import plan_bitmap
    from ..bitwidth.profile import parse_formats, read_profile

    if sum(x is not None for x in (args.max_loss, args.target_size, args.bytes_per_token)) != 1:
        raise InvalidArgument("give exactly one of --max-loss (e.g. 2%), --target-size (e.g. 300MB) and "
                              "--bytes-per-token (e.g. 200KB, with --cache-size)")
    if args.bytes_per_token is not None and args.cache_size is None:
        raise InvalidArgument("--bytes-per-token needs --cache-size SIZE: the expert cache the bytes are read past")
    max_loss = parse_loss(args.max_loss) if args.max_loss is not None else None
    target = parse_target_size(args.target_size) if args.target_size is not None else None
    bpt = parse_size_flag(args.bytes_per_token, "--bytes-per-token", zero_ok=True)
    cache_size = parse_size_flag(args.cache_size, "--cache-size", zero_ok=True)
    formats = parse_formats(args.formats) if args.formats else None
    out = Path(args.output)
    if out.is_dir():
        raise InvalidArgument(f"{out}: is a directory; -o takes the plan's file name")
    check_output_path(out, "-o")
    if args.png:
        check_output_path(args.png, "--png")
    from ..api import set_threads

    set_threads(args.threads, name="--threads")
    profile = read_profile(args.profile)
    log = None if args.quiet else eprint
    plan = make_plan(profile, max_loss=max_loss, target_size=target, bytes_per_token=bpt, cache_size=cache_size,
                     candidates=formats, top=args.top,
                     estimate=args.estimate,
                     verify=not args.no_verify, max_evals=args.max_evals, model_dir=args.model, calib=args.calib,
                     holdback=args.holdback, margin=args.margin, heldout=args.heldout,
                     progress=not args.quiet and sys.stderr.isatty(), log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1) + "\n")
    m = plan["meta"]
    counts = ", ".join(f"{f} x{n}" for f, n in m["counts"].items())
    goal = (f"max loss {100 * max_loss:g}%" if max_loss is not None
            else f"target size {format_bytes(target)} ({target} bytes)" if target is not None
            else f"{format_bytes(bpt)} read per token with a {format_bytes(cache_size)} expert cache")
    eprint(f"plan for {goal}: {counts}")
    eprint(f"  expected size   {format_bytes(m['expert_bytes'])} of experts ({m['expert_bytes']} bytes), "
           f"{m['ratio']:.2f}x smaller than all-{m['top_format']} ({format_bytes(m['top_bytes'])}), "
           f"{m['bits_per_weight']:.2f} bits/weight")
    loss = f"  expected loss   {100 * m['predicted_loss']:+.2f}% perplexity (predicted from the profile)"
    if m["measured_loss"] is not None:
        c = m["calibration"]
        loss += (f", {100 * m['measured_loss']:+.2f}% measured on {c['tokens']:,} calibration tokens "
                 f"(ppl {c['reference_ppl']:.3f} -> {c['reference_ppl'] * (1 + m['measured_loss']):.3f})")
    if m.get("margin") and m["measured_loss"] is not None:
        loss += (f"\n                  (held to {100 * m['margin']['calibration_tolerance']:.2f}% on calibration text: "
                 f"{100 * m['margin']['share']:g}% of the tolerance kept for other text, --margin)")
    parts = m.get("measured_parts")
    if parts:
        loss += (f"\n                  (the worse of: {100 * parts['search']:+.2f}% on the part searched, "
                 f"{100 * parts['held_back']:+.2f}% on the held-back calibration windows)")
    if m.get("heldout"):
        h = m["heldout"]
        loss += (f"\n  held-out loss   {100 * h['loss']:+.2f}% on {h['tokens']:,} tokens of {h['text']} "
                 f"(ppl {h['reference_ppl']:.3f} -> {h['ppl']:.3f})")
    eprint(loss)
    if m.get("traffic"):
        t = m["traffic"]
        eprint(f"  per token       {format_bytes(int(t['bytes_per_token']))} of experts read (expected) with a "
               f"{format_bytes(t['cache_size'])} expert cache holding the {t['cached_units']} most used of "
               f"{m['blobs']} blobs (hit rate {100 * t['hit_rate']:.1f}%)")
    eprint(f"wrote {out}; convert with: edgemoe convert {m.get('model') or 'HF_DIR'} OUT_DIR --plan {out}")
    if not args.no_plot:
        from ..bitwidth.apply import assignment
        from ..store.manifest import ExpertPlan

        shape = profile["shape"]
        fmts = assignment(ExpertPlan.from_dict(plan, str(out)), shape["moe_layers"], shape["experts_per_layer"])
        png = Path(args.png) if args.png else out.with_suffix(".png")
        bits = {f: profile["formats"][f]["bits"] for f in profile["formats"]}
        title = (f"{goal}: {format_bytes(m['expert_bytes'])} of experts ({m['ratio']:.2f}x smaller), "
                 f"{m['bits_per_weight']:.2f} bits/weight")
        reason = plan_bitmap(fmts, bits, png, title)
        eprint(f"wrote {png}" if reason is None else f"note: {reason}")
    if args.json:
        print(json.dumps(m))
    return 0
