"""What the decode-step C calls (edgemoe/fastops.py) save, side by side with the torch ops
they replace, in the same process and interleaved.

1. One-position attention over S cached positions (the bench model's GQA shape, 16 query
   and 4 K/V heads of 128, bf16): torch's SDPA kernel, the four fp32 torch ops
   (models.attention.decode_attention) and the C call with its KV append
   (KVCache.attend_one).
2. With --model (a converted model with int4/int8 resident layers): decode tokens/s with
   the attention half of each layer as one C call (Attention.decode_half) and without
   (the module-by-module path), alternating; and decode after 1500- and 3500-token prompts
   with the C attention against torch's ops past 512 positions.

    python -m edgemoe_lab.experiments.decode_ops [--model DIR] [--threads N] -o OUT.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgemoe_lab.peer.machine import cpu_flags, cpu_model


def attention_rows(positions: list[int], rounds: int) -> list[str]:
    from edgemoe.models.attention import KVCache, decode_attention

    heads, kv, D = 16, 4, 128
    out = ["| cached positions | SDPA us | four torch ops us | C call (+ KV append) us | SDPA / C |", "|---|---|---|---|---|"]
    for S in positions:
        torch.manual_seed(0)
        q = torch.randn(1, heads, 1, D).bfloat16()  # (1, heads, 1, D)
        k, v = torch.randn(1, kv, S, D).bfloat16(), torch.randn(1, kv, S, D).bfloat16()  # (1, kv, S, D)
        k1, v1 = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
        cache = KVCache(capacity=S)
        cache.update(k[:, :, :-1], v[:, :, :-1])

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        def ops():
            decode_attention(q, k, v, None, None)

        def c_call():
            cache.offset = S - 1
            assert cache.attend_one(q, k1, v1, None) is not None

        times = {f: [] for f in (sdpa, ops, c_call)}
        for _ in range(rounds):
            for f in times:
                for _ in range(20):
                    f()
                t = time.perf_counter()
                for _ in range(200):
                    f()
                times[f].append((time.perf_counter() - t) / 200 * 1e6)
        a, b, c = (statistics.median(times[f]) for f in (sdpa, ops, c_call))
        out.append(f"| {S} | {a:.1f} | {b:.1f} | {c:.1f} | {a / c:.1f}x |")
    return out


def decode_rows(model: str, rounds: int, tokens: int) -> list[str]:
    import edgemoe
    from edgemoe.generate import stream_generate
    from edgemoe.models.attention import Attention

    eng = edgemoe.load(model, mode="io-free", threads=torch.get_num_threads())
    attns = [m for m in eng.model.modules() if type(m) is Attention]

    def rate(fused: bool) -> float:
        for a in attns:
            a._half = None if fused else False  # None: decided again on the next call
        first, n = None, 0
        for r in stream_generate(eng.model, eng.tokenizer, list(range(5, 60)), tokens, lambda s: int(s.argmax()),
                                 (), (), True, None):
            if r.token is None:
                continue
            if first is None:
                first = time.perf_counter()
            else:
                n += 1
        return n / (time.perf_counter() - first)

    res = {True: [], False: []}
    for _ in range(rounds):
        for fused in (True, False):
            res[fused].append(rate(fused))
    f, m = statistics.median(res[True]), statistics.median(res[False])
    return ["| path | decode tok/s (median, min-max) |", "|---|---|",
            f"| attention half as one C call | {f:.1f} ({min(res[True]):.1f}-{max(res[True]):.1f}) |",
            f"| module by module | {m:.1f} ({min(res[False]):.1f}-{max(res[False]):.1f}) |",
            "", f"Ratio: **{f / m:.3f}x**."]


def long_rows(model: str, positions: list[int], rounds: int, tokens: int = 32) -> list[str]:
    """Decode after a long prompt with every layer's attention in C (the fused half and
    KVCache.attend_one) against torch's four ops for positions past 512 (the module path
    with attend_one declined), alternating in one process."""
    import edgemoe
    import edgemoe.models.attention as A

    eng = edgemoe.load(model, mode="io-free", threads=torch.get_num_threads())
    one, half, limit = A.attend_one, A.attn_half, [None]
    A.attend_one = lambda q, k, v, kb, vb, pos, scale: (None if limit[0] is not None and pos >= limit[0]
                                                          else one(q, k, v, kb, vb, pos, scale))
    A.attn_half = lambda *a: None if limit[0] is not None and a[11] >= limit[0] else half(*a)
    g = torch.Generator().manual_seed(0)
    out = ["| prompt tokens | C attention tok/s | torch ops past 512 positions tok/s | C / torch |", "|---|---|---|---|"]
    try:
        for P in positions:
            ids = torch.randint(5, eng.model.args.vocab_size - 1, (P,), generator=g).tolist()
            res = {None: [], 512: []}
            for _ in range(rounds):
                for lim in res:
                    limit[0] = lim
                    first, n = None, 0
                    for _ in eng.stream(ids, max_tokens=tokens + 1, temperature=0, ignore_eos=True):
                        if first is None:
                            first = time.perf_counter()
                        n += 1
                    res[lim].append((n - 1) / (time.perf_counter() - first))
            c, t = statistics.median(res[None]), statistics.median(res[512])
            out.append(f"| {P} | {c:.1f} | {t:.1f} | {c / t:.2f}x |")
    finally:
        A.attend_one, A.attn_half = one, half
        eng.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="converted model for the decode rows (int4/int8 resident layers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48, help="decoded tokens per decode run")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    lines = ["# Decode-step C calls vs the torch ops they replace", "",
             f"Command: `python -m edgemoe_lab.experiments.decode_ops {' '.join(argv or __import__('sys').argv[1:])}`"
             f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             f"Machine: {cpu_model()}, {torch.get_num_threads()} thread(s); SIMD flags: {' '.join(simd)}; load "
             f"average at the start {Path('/proc/loadavg').read_text().split()[0]}. Medians of {args.rounds} "
             "interleaved rounds.", "",
             "## One-position attention (16 query / 4 K/V heads of 128, bf16; 200 calls per round)", ""]
    lines += attention_rows([100, 500, 2000], args.rounds)
    if args.model:
        lines += ["", f"## Decode, `{args.model}` (io-free, {args.tokens} tokens after a 55-token prompt)", ""]
        lines += decode_rows(args.model, args.rounds, args.tokens)
        lines += ["", f"## Decode after long prompts, `{args.model}` (io-free, 32 tokens; medians of 3 alternating rounds)",
                  "", "The whole decode step, where the isolated ops above do not tell: torch's ops run in the",
                  "engine's process (its allocator settings, caches shared with the weights' streams).", ""]
        lines += long_rows(args.model, [1500, 3500], 3)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
