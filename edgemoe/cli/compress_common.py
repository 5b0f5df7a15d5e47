"""Options shared by `edgemoe prune` and `edgemoe merge`."""

from __future__ import annotations

import argparse
import json

from .common import check_output_dir


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory")
    p.add_argument("output", metavar="OUT_DIR", help="where to write the new model directory (must not exist, "
                                                     "or be empty)")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text (default: the bundled calibration text)")
    p.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help="calibration tokens to measure on, rounded down to whole windows (default 16384)")
    p.add_argument("--context", type=int, default=None, metavar="T",
                   help="window length (default: min(512, the model's maximum positions))")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def prepare(args: argparse.Namespace) -> None:
    """Validate the shared options before any model is read."""
    from ..errors import InvalidArgument

    if args.calib_tokens < 1:
        raise InvalidArgument(f"--calib-tokens must be positive, got {args.calib_tokens}")
    if args.context is not None and args.context < 2:
        raise InvalidArgument(f"--context must be at least 2, got {args.context}")
    from pathlib import Path

    out = Path(args.output)
    if out.is_dir() and any(out.iterdir()):
        raise InvalidArgument(f"OUT_DIR {out}: exists and is not empty")
    check_output_dir(out, "OUT_DIR")
    from ..api import set_threads

    set_threads(args.threads, name="--threads")


def show(report: dict, as_json: bool, lines: list[str]) -> None:
    print(json.dumps(report, indent=2) if as_json else "\n".join(lines))
