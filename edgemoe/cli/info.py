"""`edgemoe info`: what a model directory holds and what running it takes.

For a Hugging Face directory or one written by 'edgemoe convert' (or a hub id): the
family, parameter counts, resident and expert bytes, each expert's storage format (a
histogram of bits), the minimum memory budget and the default context size (as
'edgemoe generate --memory' would work them out: runtime.loading.memory_plan), and
whether an expert predictor is fitted. Only headers and manifests are read, never the
weights.
"""

from __future__ import annotations

import argparse
import json

from ..utils import format_bytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe info",
        description="Describe a model: family, parameters, resident and expert bytes, expert formats, the minimum "
                    "memory budget, the context size, and the expert predictor. Reads headers only.")
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory, a directory from 'edgemoe convert', or a hub id ORG/NAME "
                        "(default: the bundled model)")
    p.add_argument("--memory", default=None,
                   help="also show the context size and expert cache this budget gives (converted models), e.g. 1GB")
    p.add_argument("--ctx-size", "-c", type=int, default=None, metavar="N",
                   help="context size to size the KV cache for (default: as 'edgemoe generate' picks it)")
    p.add_argument("--dtype", default=None, help="compute dtype: auto (default), float32, bfloat16")
    p.add_argument("--no-onednn", action="store_true",
                   help="size the workspace for runs with --no-onednn (no oneDNN reserve)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    info = model_info(args.model, memory=args.memory, ctx_size=args.ctx_size, dtype=args.dtype,
                      onednn=not args.no_onednn)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_info(info))
    return 0


# ----------------------------------------------------------------------------- facts


def model_info(model=None, *, memory=None, ctx_size=None, dtype=None, onednn: bool = True) -> dict:
    """A JSON-ready description of a model directory (see the module docstring)."""
    from pathlib import Path

    from ..api import default_model_dir
    from ..runtime.loading import check_ctx_size
    from ..store.manifest import is_converted
    from ..errors import InvalidArgument
    from ..hub import resolve_model
    from ..utils import parse_size

    path = default_model_dir() if model is None else resolve_model(model)
    budget = parse_size(memory) if memory is not None else None
    converted = is_converted(path)
    if budget is not None and not converted:
        raise InvalidArgument(f"{path}: --memory applies to converted models; run 'edgemoe convert {path} OUT_DIR' "
                              "first (the minimum budget such a conversion needs is shown without --memory)")
    facts = _converted(path, dtype) if converted else _hf(path, dtype)
    args, dt, kv_per_token = facts.pop("_args"), facts.pop("_dtype"), facts.pop("_kv_per_token")
    max_pos = args.max_position_embeddings
    explicit_ctx = ctx_size is not None
    ctx = check_ctx_size(ctx_size, max_pos, str(path))
    plan = _plan(facts, args, dt, path, None, ctx, explicit_ctx, kv_per_token, onednn)
    memory_facts = {
        "min_budget_bytes": plan.min_budget,  # oneDNN's use depends on the model, not the budget
        "ctx_size": plan.ctx_size,
        "max_position_embeddings": max_pos,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes": plan.kv_bytes,
        "workspace_bytes": plan.workspace,
        "onednn": plan.onednn,
        "io_free_bytes": facts["resident_bytes"] + facts["state_bytes"] + plan.kv_bytes + plan.workspace + facts["expert_cache_bytes"],
    }
    if budget is not None:
        b = _plan(facts, args, dt, path, budget, ctx, explicit_ctx, kv_per_token, onednn)
        memory_facts["with_budget"] = {"budget_bytes": budget, "ctx_size": b.ctx_size, "kv_bytes": b.kv_bytes,
                                       "workspace_bytes": b.workspace, "cache_bytes": b.capacity,
                                       "cache_share": b.capacity / facts["expert_cache_bytes"]}
    return {"path": str(Path(path)), **facts, "memory": memory_facts}


def _plan(facts: dict, args, dt, path, budget, ctx, explicit_ctx, kv_per_token, onednn):
    from ..runtime.loading import memory_plan

    # The same arithmetic as load_converted: a recurrent state joins what the budget holds besides the KV cache.
    return memory_plan(args, dt, path, budget, ctx, explicit_ctx, facts["resident_bytes"] + facts["state_bytes"],
                       kv_per_token, facts["min_cache_bytes"], facts["expert_cache_bytes"], onednn, "io-exp")


def _shape(family_name: str, args, resident_params: int) -> dict:
    """Architecture and parameter counts from the config and the meta-device model."""
    moe = args.moe_layers()
    matrices = 3 if getattr(args, "expert_gated", True) else 2  # gate, up, down; ungated experts: w1, down
    per_expert = matrices * args.hidden_size * args.expert_dim
    experts = len(moe) * args.experts_per_layer * per_expert
    # An encoder-decoder's num_hidden_layers counts its encoder (Switch: num_decoder_layers, NLLB: decoder_layers).
    decoder = (getattr(args, "num_decoder_layers", None) or getattr(args, "decoder_layers", None)
               if getattr(args, "is_encoder_decoder", False) else None)
    return {
        "family": family_name,
        "layers": args.num_hidden_layers,
        **({"decoder_layers": decoder} if decoder else {}),
        "moe_layers": len(moe),
        "experts_per_layer": args.experts_per_layer,
        "top_k": args.top_k,
        "hidden_size": args.hidden_size,
        "expert_dim": args.expert_dim,
        "params": {
            "total": resident_params + experts,
            "active": resident_params + len(moe) * args.top_k * per_expert,  # per token: resident + top-k experts
            "resident": resident_params,
            "experts": experts,
            "per_expert": per_expert,
        },
    }


def _meta(family, args, dt):
    from ..checkpoint import build_on_meta

    model = build_on_meta(family, args)
    return (sum(p.numel() for p in model.parameters()), model.kv_bytes_per_token(dt), model.fp32_names(),
            model.state_bytes(dt))


def _histogram(formats: dict) -> list[dict]:
    """Experts per bitwidth, fewest bits first."""
    bins: dict[float, dict] = {}
    for name, f in formats.items():
        b = bins.setdefault(f["bits"], {"bits": f["bits"], "experts": 0, "formats": []})
        b["experts"] += f["experts"]
        b["formats"].append(name)
    return [bins[k] for k in sorted(bins)]


def _converted(path, dtype) -> dict:
    from ..checkpoint import parse_dtype
    from ..models import get_family
    from ..runtime.loading import min_cache_bytes, resident_nbytes
    from ..store.manifest import read_manifest
    from ..store.reader import check_manifest, manifest_dtype

    manifest = read_manifest(path)
    args = check_manifest(manifest)
    family = get_family(manifest.model_type, str(manifest.path))
    dt = manifest_dtype(manifest) if dtype in (None, "auto") else parse_dtype(dtype, manifest.config)
    resident_params, kv_per_token, fp32, state = _meta(family, args, dt)
    counts: dict[str, int] = {}
    for e in manifest.experts:
        counts[e.format] = counts.get(e.format, 0) + 1
    formats = {name: {"bits": f.bits, "experts": counts.get(name, 0), "bytes": f.size}
               for name, f in manifest.formats.items() if counts.get(name)}
    fb = manifest.fallback  # small copies (convert --fallback-bits)
    files = {name: (path / name).stat().st_size
             for name in (manifest.resident_file, manifest.store_file, *([fb.file] if fb else []))
             if (path / name).exists()}
    return {
        "kind": "converted",
        "created_by": manifest.created_by,
        "manifest_version": manifest.version,
        **_shape(manifest.model_type, args, resident_params),
        "dtype": str(dt).removeprefix("torch."),
        "resident_bytes": resident_nbytes(path, manifest, dt, fp32),
        "resident_int8_layers": len(manifest.resident_int8),
        "resident_int4_layers": len(manifest.resident_int4),
        "expert_bytes": sum(e.size for e in manifest.experts if e.shares is None),  # a shared blob once
        "shared_experts": sum(1 for e in manifest.experts if e.shares is not None),
        "expert_cache_bytes": manifest.expert_bytes,
        "fallback": ({"format": fb.experts[0].format if fb.experts else None, "bytes": fb.bytes, "file": fb.file}
                     if fb else None),
        "min_cache_bytes": min_cache_bytes(manifest, args.top_k),
        "formats": formats,
        "bits_histogram": _histogram(formats),
        "files": files,
        "disk_bytes": sum(files.values()),
        "predictor": _predictor(path, args),
        "state_bytes": state,  # recurrent layers' fixed-size state per sequence (0 without them)
        "_args": args, "_dtype": dt, "_kv_per_token": kv_per_token,
    }


def _hf(path, dtype) -> dict:
    from ..checkpoint import HFCheckpoint, bias_names, parse_dtype
    from ..quant.formats import for_experts, get_format
    from ..store.manifest import ExpertBiases, FormatInfo, round_up

    ckpt = HFCheckpoint(path)  # config and safetensors headers only
    args = ckpt.args
    dt = parse_dtype(dtype, ckpt.config)
    resident_params, kv_per_token, _, state = _meta(ckpt.family, args, dt)
    shape = _shape(ckpt.config.get("model_type"), args, resident_params)
    elem = dt.itemsize
    files = sorted({r.file for r in ckpt.refs})
    # What 'edgemoe convert' stores without --bits or --plan: bf16 experts for half-precision
    # checkpoints, fp32 for fp32 ones; each blob padded to the 4 KiB alignment.
    name = "fp32" if str(dt) == "torch.float32" else "bf16"
    # Ungated experts (Switch, NLLB-MoE) take the one-matrix layout; biases (gpt-oss, NLLB-MoE) go with each blob.
    parts = bias_names(ckpt.expert_parts)
    biases = ExpertBiases(dt, parts) if parts else None
    fmt = FormatInfo.of(for_experts(get_format(name), args.expert_gated), args.hidden_size, args.expert_dim, biases)
    n_experts = shape["moe_layers"] * args.experts_per_layer
    formats = {name: {"bits": fmt.bits, "experts": n_experts, "bytes": fmt.size}}
    return {
        "kind": "hf",
        **shape,
        "architectures": ckpt.config.get("architectures"),
        "dtype": str(dt).removeprefix("torch."),
        "resident_bytes": resident_params * elem,
        "expert_bytes": shape["params"]["experts"] * elem,
        # As 'edgemoe convert' would store them (unquantized): what the budget arithmetic uses.
        "expert_cache_bytes": n_experts * round_up(fmt.size),
        "min_cache_bytes": args.top_k * round_up(fmt.size),
        "formats": formats,
        "bits_histogram": _histogram(formats),
        "files": {f.name: f.stat().st_size for f in files},
        "disk_bytes": sum(f.stat().st_size for f in files),
        "predictor": {"fitted": False, "note": "predictors are fitted on converted models ('edgemoe fit-predictor')"},
        "state_bytes": state,  # recurrent layers' fixed-size state per sequence (0 without them)
        "_args": args, "_dtype": dt, "_kv_per_token": kv_per_token,
    }


def _predictor(path, args) -> dict:
    from ..errors import EdgeMoEError
    from ..runtime.predict import PREDICTOR_FILE, PredictorStats

    file = path / PREDICTOR_FILE
    if not file.exists():
        return {"fitted": False, "note": "preloading uses the gate look-ahead; fit path statistics with "
                                         "'edgemoe trace' and 'edgemoe fit-predictor'"}
    try:
        stats = PredictorStats.load(file)
    except EdgeMoEError as e:
        return {"fitted": False, "file": str(file), "error": str(e)}
    h = stats.header
    out = {"fitted": True, "file": str(file), "max_distance": h.get("max_distance"),
           "tokens": sum(int(s.get("tokens", 0)) for s in h.get("fitted_on", []) if isinstance(s, dict))}
    if (list(h.get("moe_layers", [])) != args.moe_layers() or h.get("num_experts") != args.experts_per_layer
            or h.get("top_k") != args.top_k):
        out["fitted"] = False
        out["error"] = f"{file}: fitted for a different model (MoE layers, experts or top-k differ)"
    return out


# ----------------------------------------------------------------------------- text


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def format_info(i: dict) -> str:
    p, m = i["params"], i["memory"]
    kind = (f"converted by {i['created_by'] or 'edgemoe'} (manifest version {i['manifest_version']})"
            if i["kind"] == "converted" else "Hugging Face checkpoint")
    rows = [
        ("model", f"{i['path']}  ({kind})"),
        ("family", f"{i['family']}: {i['layers']} "
                   + (f"encoder + {i['decoder_layers']} decoder " if i.get("decoder_layers") else "")
                   + f"layers ({i['moe_layers']} MoE), {i['experts_per_layer']} experts "
                   f"per layer, top-{i['top_k']}; hidden {i['hidden_size']}, expert dim {i['expert_dim']}"),
        ("parameters", f"{_params(p['total'])} total, {_params(p['active'])} active per token "
                       f"(resident {_params(p['resident'])}, experts {_params(p['experts'])})"),
        ("resident", f"{format_bytes(i['resident_bytes'])} in RAM as {i['dtype']}"
                     + (f" ({i['resident_int8_layers']} linear layers int8)" if i.get("resident_int8_layers") else "")
                     + (f" ({i['resident_int4_layers']} linear layers int4)" if i.get("resident_int4_layers") else "")),
    ]
    n_experts = sum(b["experts"] for b in i["bits_histogram"])
    if i["kind"] == "converted":
        shared = (f"; {i['shared_experts']} share another's blob (merged), stored and cached once"
                  if i.get("shared_experts") else "")
        rows.append(("experts", f"{n_experts} experts, {format_bytes(i['expert_bytes'])} "
                                f"({format_bytes(i['expert_cache_bytes'])} as 4 KiB-aligned blobs read and cached"
                                f"{shared})"))
    else:
        rows.append(("experts", f"{n_experts} experts, {format_bytes(i['expert_bytes'])} as {i['dtype']} "
                                f"(all in RAM; 'edgemoe convert' stores them as {format_bytes(i['expert_cache_bytes'])} "
                                "of blobs)"))
    for j, b in enumerate(i["bits_histogram"]):
        rows.append(("bits" if j == 0 else "", f"{b['bits']:.4g} bits ({', '.join(b['formats'])}): {b['experts']} "
                                               f"expert{'s' if b['experts'] != 1 else ''} "
                                               f"{_bar(b['experts'], n_experts)}"))
    if i.get("fallback"):
        f = i["fallback"]
        rows.append(("small copies", f"{f['format']}, {format_bytes(f['bytes'])} in {f['file']}: read instead of the "
                                     "full copy on a miss of a low-weight expert with --fallback-below W"))
    rows.append(("on disk", f"{format_bytes(i['disk_bytes'])} in " + ", ".join(i["files"])))
    minimum = (f"{format_bytes(m['min_budget_bytes'])} (--memory {m['min_budget_bytes']}): resident weights, "
               f"KV cache, workspace and one layer's top-{i['top_k']} experts")
    if i["kind"] == "hf":
        minimum = f"after 'edgemoe convert' (unquantized experts): {minimum}; in RAM as it is: " \
                  f"{format_bytes(m['io_free_bytes'])}"
    else:
        minimum += f"; every expert in RAM (--mode io-free): {format_bytes(m['io_free_bytes'])}"
    rows.append(("min budget", minimum))
    rows.append(("context", f"{m['ctx_size']} tokens (of {m['max_position_embeddings']} positions), KV cache "
                            f"{format_bytes(m['kv_bytes'])} ({format_bytes(m['kv_bytes_per_token'])}/token)"))
    if "with_budget" in m:
        w = m["with_budget"]
        rows.append(("--memory", f"{format_bytes(w['budget_bytes'])}: context {w['ctx_size']} tokens, expert cache "
                                  f"{format_bytes(w['cache_bytes'])} ({100 * w['cache_share']:.0f}% of the experts)"))
    pr = i["predictor"]
    if pr.get("fitted"):
        text = f"fitted ({pr['file']}, {pr['tokens']} tokens, up to {pr['max_distance']} layers ahead)"
    elif pr.get("error"):
        text = f"unusable: {pr['error']}"
    else:
        text = f"none ({pr['note']})"
    rows.append(("predictor", text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _bar(n: int, total: int, width: int = 20) -> str:
    return "#" * max(1, round(width * n / total)) if total else ""
