"""Freed temporaries back to the OS at once, or kept in the heap for reuse: what it costs
generation after `load_converted`, in the same process and interleaved.

Loading sets glibc's mmap threshold to 1 MB (`utils.return_large_frees_to_os`), so that
freed load-time temporaries leave RSS. Generation used to run with that setting too:
then every block of 1 MB and more (prefill activations, the expert intermediates of a
chunk, the fp32 copies of a long KV cache in the torch attention path) was a fresh mmap,
page-faulted in on each use and unmapped on free. Since this change load_converted
ends with `utils.keep_frees_for_reuse(workspace)`. Measured here, alternating the two
settings (mallopt) in one process on one loaded model:

- prefill tokens/s of fresh random prompts (none repeats, so no prompt cache);
- decode tokens/s;
- RSS left after each prefill, over the RSS before it (what the heap keeps);
- the torch attention path (models.attention.decode_attention, used for batched rows and
  without a C compiler) over a cache of --positions positions, in microseconds.

    python -m edgemoe_lab.experiments.malloc_reuse --model DIR [--threads N] -o OUT.md
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

from edgemoe_lab.peer.machine import cpu_model


def _set(mode: str, workspace: int) -> None:
    from edgemoe.utils import keep_frees_for_reuse, return_large_frees_to_os

    libc = ctypes.CDLL(None)
    if mode == "fresh mmaps":
        return_large_frees_to_os()
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD: glibc's default
    else:
        keep_frees_for_reuse(workspace)
    libc.malloc_trim(0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a converted model directory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per prefill")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    p.add_argument("--positions", type=int, default=1500, help="cached positions for the attention row")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)

    import edgemoe
    from edgemoe.models.attention import decode_attention
    from edgemoe.utils import rss_bytes

    eng = edgemoe.load(args.model, mode="io-free", threads=args.threads)
    workspace = eng.info["workspace_bytes"]
    vocab = eng.model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    heads, kv, D = 16, 4, 128
    q = torch.randn(1, heads, 1, D, generator=g).bfloat16()  # (1, heads, 1, D)
    k = torch.randn(1, kv, args.positions, D, generator=g).bfloat16()  # (1, kv, S, D)
    v = torch.randn(1, kv, args.positions, D, generator=g).bfloat16()
    modes = ("fresh mmaps", "kept for reuse")
    rows = {m: {"prefill": [], "decode": [], "rss": [], "attn": []} for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            _set(mode, workspace)
            r = rows[mode]
            ids = torch.randint(5, vocab - 1, (args.prompt,), generator=g).tolist()
            before = rss_bytes()
            t0 = time.perf_counter()
            first = None
            n = 0
            for _ in eng.stream(ids, max_tokens=args.tokens + 1, temperature=0, ignore_eos=True):
                if first is None:
                    first = time.perf_counter()
                    r["rss"].append((rss_bytes() - before) / 1e6)
                n += 1
            end = time.perf_counter()
            r["prefill"].append(len(ids) / (first - t0))
            r["decode"].append((n - 1) / (end - first))
            for _ in range(3):
                decode_attention(q, k, v, None, None)
            t = time.perf_counter()
            for _ in range(20):
                decode_attention(q, k, v, None, None)
            r["attn"].append((time.perf_counter() - t) / 20 * 1e6)
    eng.close()
    med = {m: {c: statistics.median(vals) for c, vals in rows[m].items()} for m in modes}
    a, b = med[modes[0]], med[modes[1]]
    lines = ["# Freed temporaries: fresh mmaps or kept in the heap (generation after load_converted)", "",
             f"Command: `python -m edgemoe_lab.experiments.malloc_reuse {' '.join(argv or sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             f"Machine: {cpu_model()}, {args.threads} thread(s); load average at the end "
             f"{Path('/proc/loadavg').read_text().split()[0]}. Model `{args.model}` (io-free), workspace "
             f"{workspace / 1e6:.1f} MB. Medians of {args.rounds} interleaved rounds; {args.prompt}-token random "
             f"prompts, {args.tokens} decoded tokens.", "",
             "| setting | prefill tok/s | decode tok/s | RSS kept after prefill MB | torch attention, "
             f"{args.positions} positions, us |", "|---|---|---|---|---|"]
    for m in modes:
        x = med[m]
        lines.append(f"| {m} | {x['prefill']:.1f} | {x['decode']:.1f} | {x['rss']:.1f} | {x['attn']:.0f} |")
    lines += ["", f"Kept / fresh: prefill **{b['prefill'] / a['prefill']:.2f}x**, decode {b['decode'] / a['decode']:.2f}x, "
              f"torch attention {a['attn'] / b['attn']:.2f}x faster."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
