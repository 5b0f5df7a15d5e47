"""`edgemoe fit-predictor`: fit the expert predictors used for preloading.

    edgemoe trace OUT_DIR -o calib.npz                                 # the calibration text
    edgemoe trace OUT_DIR --text edgemoe/assets/heldout.txt -o heldout.npz
    edgemoe fit-predictor OUT_DIR --trace calib.npz --eval heldout.npz

Counts the frequency priors and EdgeMoE's path tables on the traces, chooses how to mix
the tables with the gate look-ahead, writes OUT_DIR/predictor.npz (then `generate
OUT_DIR` preloads with the `combined` predictor by default), and prints each predictor's
recall@n and precision@n on --eval (or, optimistically, on the fitting traces).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import check_output_path, eprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe fit-predictor",
                                description="Fit expert predictors for preloading from routing traces.")
    p.add_argument("model", metavar="MODEL_DIR",
                   help="directory from 'edgemoe convert' (or a Hugging Face directory) the traces were recorded on")
    p.add_argument("--trace", action="append", required=True, metavar="TRACE.npz",
                   help="routing trace from 'edgemoe trace' to fit on (repeatable)")
    p.add_argument("--eval", default=None, metavar="TRACE.npz", help="held-out routing trace to report recall on")
    p.add_argument("--distance", type=int, default=2, help="fit tables up to this many MoE layers ahead (default 2)")
    p.add_argument("--beta", type=float, default=None, help="smoothing strength of the path tables (default 4)")
    p.add_argument("--output", "-o", default=None, help="where to write the predictor (default MODEL_DIR/predictor.npz)")
    p.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")
    return p


def model_shape(path: Path) -> tuple[list[int], int, int]:
    """(MoE layers, experts per layer, top-k) of a converted or Hugging Face directory."""
    from ..store.manifest import is_converted
    from ..checkpoint import read_config
    from ..models import get_family
    from ..store.manifest import read_manifest
    from ..store.reader import check_manifest

    if is_converted(path):
        args = check_manifest(read_manifest(path))
    else:
        config = read_config(path)
        src = str(path / "config.json")
        args = get_family(config.get("model_type"), src).ModelArgs.from_dict(config, src)
    return args.moe_layers(), args.experts_per_layer, args.top_k


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import InvalidArgument
    from ..runtime.fit import DEFAULT_BETA, evaluate, fit
    from ..runtime.predict import PREDICTOR_FILE, make_predictor
    from ..runtime.trace import RoutingTrace

    if args.distance < 1:
        raise InvalidArgument("--distance must be at least 1")
    path = Path(args.model)
    check_output_path(Path(args.output) if args.output else path / PREDICTOR_FILE, "-o" if args.output else "MODEL_DIR")
    layers, E, k = model_shape(path)
    traces = [RoutingTrace.load(t) for t in args.trace]
    for t in traces:
        t.check_model(layers, E, k)
    held = RoutingTrace.load(args.eval) if args.eval else None
    if held is not None:
        held.check_model(layers, E, k)
    stats = fit(traces, max_distance=args.distance, beta=args.beta if args.beta is not None else DEFAULT_BETA)
    out = Path(args.output) if args.output else path / PREDICTOR_FILE
    stats.save(out)

    target = held or traces[0]
    has_gate = target.lookahead is not None
    ns = list(range(1, min(E, 2 * k + 1) + 1))
    report = {"predictor": str(out), "fitted_on": stats.header["fitted_on"],
              "evaluated_on": str(target.source), "held_out": held is not None, "results": {}}
    methods = ["freq", "table"] + (["gate", "combined"] if has_gate else [])
    for d in range(1, stats.max_distance + 1):
        if has_gate and target.lookahead.shape[2] < d:
            break
        for m in methods:
            pred = make_predictor(m, stats, None, layers, E, k)
            r = evaluate(pred, target, ns, d)
            report["results"][f"{m}@{d}"] = {"distance": d, "method": m, "recall": r["recall"],
                                            "precision": r["precision"]}
    if args.json:
        print(json.dumps(report))
        return 0
    eprint(f"fitted on {sum(f['tokens'] for f in stats.header['fitted_on'])} tokens -> {out}")
    where = "held-out trace" if held is not None else "the fitting trace (optimistic: no held-out trace given)"
    eprint(f"recall@n (precision@n) on the {where} {target.source}, top-{k} of {E} experts:")
    eprint("  " + "predictor".ljust(16) + "".join(f"n={n}".rjust(16) for n in ns))
    for name, r in report["results"].items():
        m, d = r["method"], r["distance"]
        row = "".join(f"{100 * r['recall'][n]:6.1f}% ({100 * r['precision'][n]:4.1f}%)".rjust(16) for n in ns)
        eprint("  " + f"{m}, {d} ahead".ljust(16) + row)
    return 0
