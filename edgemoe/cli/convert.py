"""`edgemoe convert`: write a Hugging Face checkpoint as resident weights + expert store."""

from __future__ import annotations

import argparse
import json
import sys

from ..utils import format_bytes
from .common import eprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe convert",
        description="Convert a Hugging Face MoE checkpoint or a GGUF file into resident weights plus an expert store that "
                    "'edgemoe generate OUT_DIR --memory SIZE' runs under a memory budget.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR|MODEL.gguf", help="Hugging Face model directory (config.json + "
                   "safetensors) or a GGUF file (llama.cpp; of a split GGUF, any part)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --force)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, choices=(16, 8, 4), default=None,
                   help="expert bitwidth: 16 (bf16), 8 (int8) or 4 (int4); default: unquantized in --dtype")
    g.add_argument("--format", dest="fmt", default=None, help="expert storage format by name (e.g. bf16, fp32)")
    g.add_argument("--plan", default=None, metavar="PLAN.json",
                   help='per-expert formats: {"version": 1, "default": "bf16", "experts": {"<layer>.<expert>": "int4"}}')
    p.add_argument("--dtype", default=None, help="dtype of the resident weights and of compute: auto (default), "
                                                 "float32, bfloat16, float16")
    p.add_argument("--resident", choices=("float", "int8", "int4"), default=None,
                   help="non-expert weights: float (default, in --dtype), int8 (attention, shared-expert, dense-MLP "
                        "and untied LM-head linears as per-channel int8; embeddings, norms and routers stay float) "
                        "or int4 (the same layers as the experts' int4: 64 weights per fp16 scale, about half "
                        "int8's bytes)")
    fb = p.add_mutually_exclusive_group()
    fb.add_argument("--fallback-bits", type=int, choices=(2, 3), default=None,
                    help="also store a small copy of every expert at 2 or 3 bits (int2, int3: 64 weights per "
                         "scale) in experts.fallback.bin, which 'generate --fallback-below W' reads instead of "
                         "the full copy on a miss of an expert with a low routing weight")
    fb.add_argument("--fallback-format", default=None, metavar="FORMAT",
                    help="the small copies' format by name instead (e.g. int2, int3, int4)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (swapped in only once the new one is complete; a "
                        "conversion killed meanwhile leaves the old model, which the next one restores if needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from ..hub import is_hub_id, resolve_model
    from ..store.convert import check_out_dir, convert, resolve_fallback

    resolve_fallback(args.fallback_bits, args.fallback_format)  # a bad format name fails before any download
    if is_hub_id(args.hf_dir) and not Path(args.hf_dir).exists():
        check_out_dir(Path(args.out_dir), args.force)  # before a download that may take hours
    source = resolve_model(args.hf_dir)  # a local path, or a hub id (ORG/NAME) fetched into the hub cache
    result = convert(source, args.out_dir, bits=args.bits, fmt=args.fmt, plan=args.plan, dtype=args.dtype,
                     resident=args.resident, force=args.force, fallback_bits=args.fallback_bits,
                     fallback_format=args.fallback_format,
                     progress=not args.quiet and not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    for note in result.recovered:
        eprint(note)
    total = result.resident_bytes + result.store_bytes
    formats = ", ".join(f"{n} x{c}" for n, c in sorted(result.formats.items()))
    eprint(f"converted {args.hf_dir} -> {result.out} in {result.seconds:.1f} s ({result.model_type}, {result.dtype})")
    int8 = (f" ({len(result.resident_int8)} linear layers int8)" if result.resident_int8 else
            f" ({len(result.resident_int4)} linear layers int4)" if result.resident_int4 else "")
    eprint(f"  resident weights  {format_bytes(result.resident_bytes):>10}  resident.safetensors{int8}")
    eprint(f"  expert store      {format_bytes(result.store_bytes):>10}  experts.bin: {result.experts} experts ({formats})")
    if result.fallback_format is not None:
        total += result.fallback_bytes
        eprint(f"  fallback copies   {format_bytes(result.fallback_bytes):>10}  experts.fallback.bin: "
               f"{result.fallback_format}")
    eprint(f"  total             {format_bytes(total):>10}  (source checkpoint {format_bytes(result.source_bytes)})")
    eprint(f"  peak RSS          {format_bytes(result.peak_rss_bytes):>10}  "
           f"({format_bytes(result.peak_rss_bytes - result.baseline_rss_bytes)} over the baseline)")
    for name, e in sorted(result.added_error.items()):
        eprint(f"  re-quantized      {name}: {e['experts']} experts, added error {100 * e['rel_rms']:.2f}% RMS of "
               f"the GGUF's dequantized weights (worst expert {100 * e['worst']:.2f}%)")
    eprint(f"run it with: edgemoe generate {result.out} --memory SIZE")
    return 0
