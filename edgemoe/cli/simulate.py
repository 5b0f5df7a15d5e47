"""`edgemoe simulate`: replay a routing trace through the expert cache, without the model.

    edgemoe trace MODEL_DIR -o trace.npz                   # or any CSV: step,layer,expert[,phase,weight]
    edgemoe simulate trace.npz --cache 25% --cache 50% --expert-bytes 12MB \\
        --bandwidth 550MB/s --compute-ms-per-layer 0.4 --plot hitrate.png

Prints, per cache size and policy, the hit rate (decode and prefill separately), the
misses and bytes read per token and, with --bandwidth and --compute-ms-per-layer, the
stall and tokens/s they imply; then the expert predictors fitted on the first part of
the trace and evaluated on the rest. See edgemoe.runtime.simulate for the model of the
cache.
"""

from __future__ import annotations

import argparse
import json

from .common import check_output_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe simulate",
                                description="Replay a routing trace through the expert cache without the model: "
                                            "hit rates, bytes per token and estimated tokens/s per policy.")
    p.add_argument("trace", metavar="TRACE", help="a .npz routing trace (edgemoe trace / --record-trace) or a CSV "
                                                  "with columns step,layer,expert[,phase,weight]")
    p.add_argument("--cache", action="append", metavar="SIZE",
                   help="cache size: a share of all experts (25%% or 0.25), a count (64) or bytes (300MB, with "
                        "--expert-bytes); repeatable (default: 25%% and 50%%)")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="eviction policy (lru, lfu, edgemoe, belady); repeatable (default: all)")
    p.add_argument("--expert-bytes", default=None, metavar="SIZE",
                   help="bytes of one expert (e.g. 12MB; 'edgemoe info' prints it): enables byte sizes and bytes/token")
    p.add_argument("--bandwidth", default=None, metavar="RATE", help="storage read rate for the estimate (550MB/s)")
    p.add_argument("--compute-ms-per-layer", type=float, default=None, metavar="MS",
                   help="compute time of one MoE layer per decode token, for the tokens/s estimate")
    p.add_argument("--top-k", type=int, default=None, help="CSV only: experts per token (default: the usual "
                                                          "request size in the file)")
    p.add_argument("--num-experts", type=int, default=None, help="CSV only: experts per layer (default: the "
                                                                "largest id + 1)")
    p.add_argument("--fit-fraction", type=float, default=0.5,
                   help="share of the trace the predictors are fitted on; they are evaluated on the rest (default 0.5)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write hit rate vs cache size for each policy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import InvalidArgument
    from ..runtime.simulate import (POLICIES, Estimate, load_workload, parse_cache, plot_sweep, predictor_report,
                                    simulate, sweep)
    from ..store.throttle import parse_rate
    from ..utils import format_bytes, parse_size

    policies = args.policy or sorted(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidArgument(f"--policy: unknown policy {unknown[0]!r} (choose from {', '.join(sorted(POLICIES))})")
    for flag, v in (("--top-k", args.top_k), ("--num-experts", args.num_experts)):
        if v is not None and v < 1:
            raise InvalidArgument(f"{flag} must be at least 1, got {v}")
    if not 0 < args.fit_fraction < 1:
        raise InvalidArgument(f"--fit-fraction must be in (0, 1), got {args.fit_fraction}")
    if args.compute_ms_per_layer is not None and not args.compute_ms_per_layer >= 0:
        raise InvalidArgument(f"--compute-ms-per-layer must be >= 0, got {args.compute_ms_per_layer}")
    expert_bytes = parse_size(args.expert_bytes) if args.expert_bytes is not None else None
    if expert_bytes is not None and expert_bytes < 1:
        raise InvalidArgument("--expert-bytes must be at least 1 byte")
    bandwidth = parse_rate(args.bandwidth) if args.bandwidth is not None else None
    wants_estimate = bandwidth is not None or args.compute_ms_per_layer is not None
    if wants_estimate and (bandwidth is None or args.compute_ms_per_layer is None or expert_bytes is None):
        raise InvalidArgument("the tokens/s estimate needs --bandwidth, --compute-ms-per-layer and --expert-bytes "
                              "together")
    if args.plot:
        check_output_path(args.plot, "--plot")

    work = load_workload(args.trace, args.top_k, args.num_experts)
    if args.top_k is not None and work.top_k != args.top_k:
        raise InvalidArgument("--top-k applies to CSV traces only")
    estimate = (Estimate(expert_bytes, bandwidth, args.compute_ms_per_layer, len(work.moe_layers))
                if wants_estimate else None)
    sizes = [parse_cache(c, work.total_experts, expert_bytes) for c in (args.cache or ["25%", "50%"])]
    results = [simulate(work, p, n).to_dict(expert_bytes, estimate) for n in sizes for p in policies]
    report = {
        "trace": work.source,
        "moe_layers": len(work.moe_layers), "experts_per_layer": work.num_experts, "top_k": work.top_k,
        "total_experts": work.total_experts,
        "forwards": {ph: sum(1 for f in work.forwards if f.phase == ph) for ph in ("prefill", "decode")},
        "results": results,
        "predictors": predictor_report(work, args.fit_fraction, sorted({work.top_k, 2 * work.top_k})),
    }
    if args.plot:
        plot_sweep(sweep(work, policies), work.total_experts, args.plot, f"{work.source}")
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{work.source}: {len(work.moe_layers)} MoE layers x {work.num_experts} experts, top-{work.top_k}; "
          f"{report['forwards']['prefill']} prefill and {report['forwards']['decode']} decode forwards")
    for r in results:
        size = f"{r['cache_experts']} experts" + (f" ({format_bytes(r['cache_bytes'])})" if "cache_bytes" in r else "")
        parts = []
        for ph in ("decode", "prefill"):
            d = r[ph]
            if d["tokens"]:
                extra = f", {format_bytes(d['bytes_per_token'])}/token" if "bytes_per_token" in d else \
                    f", {d['misses_per_token']} misses/token"
                parts.append(f"{ph} hit {100 * d['hit_rate']:.1f}%{extra}")
        est = r.get("estimate") or {}
        if est:
            parts.append(f"~{est['tokens_per_s']} tok/s (stall {est['stall_ms_per_token']} ms/token)")
        print(f"  cache {size:>24}  {r['policy']:<8} " + "; ".join(parts))
    pr = report["predictors"]
    if "skipped" in pr:
        print(f"predictors: skipped ({pr['skipped']})")
    else:
        print(f"predictors (fitted on {pr['fit_tokens']} tokens, evaluated on {pr['eval_tokens']}; next MoE layer):")
        for m in ("freq", "table", "gate", "combined"):
            if m in pr:
                rec = ", ".join(f"recall@{n} {v:.3f}" for n, v in pr[m]["recall"].items())
                print(f"  {m:<8} {rec}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
