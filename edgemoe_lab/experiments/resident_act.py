"""int8 vs int16 activations for the resident int8 layers (issue 15, section 4).

`convert --resident int8` stores attention projections, shared experts, dense MLPs and an
untied LM head as int8 weights with per-channel scales (quant/resident.py). The C kernel
runs them with int16 activations today (kernels.RESIDENT_ACTIVATIONS); the experts moved
to int8 activations (edgemoe_lab/results/quant_kernels.md). This measures both sides of
the same switch for the resident layers, in one process, the path toggled between runs:

- quality, on the bundled model converted with int4 experts and int8 resident layers:
  held-out perplexity, logits (relative RMS difference, top-1 agreement, KL) and greedy
  tokens, int16 vs int8 activations;
- speed, on a converted model given with --model (e.g. the 2.3 B bench model): decode
  tokens/s with the two paths alternating, median ratio over the rounds.

    python -m edgemoe_lab.experiments.resident_act --model PATH --rounds 5 -o edgemoe_lab/results/resident_act.md

--resident-formats instead compares the resident weights' storage (float, int8, int4;
`convert --resident`) on the bundled model, each against float, and appends that section
to the -o file:

    python -m edgemoe_lab.experiments.resident_act --resident-formats --threads 1 -o edgemoe_lab/results/resident_act.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgemoe_lab.peer.machine import cpu_model

BIG = 1 << 30


@contextlib.contextmanager
def packed_everywhere():
    """The packed C kernels at every batch (what decode runs), so that a perplexity over
    whole windows measures the decode path; the experts keep their default activations."""
    from edgemoe.quant import kernels as K

    names = ("PACKED_MAX_BATCH", "PACKED_MAX_BATCH_BF16_CPU", "PACKED_MAX_BATCH_BF16_CPU_INT16",
             "INT8_NATIVE_MAX_BATCH", "INT8PACK_MAX_BATCH", "INT8PACK_PREFERRED")
    saved = [getattr(K, n) for n in names]
    for n, v in zip(names, (BIG, BIG, BIG, BIG, 0, False)):
        setattr(K, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, saved):
            setattr(K, n, v)


PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n\ndef main():", "    for i in range("]


def heldout(model_dir: Path, text: str, tokens: int | None):
    """Held-out perplexity of a converted model with the packed kernels forced at every
    batch (the decode path), and the logits (4, ctx, V) of its first 4 windows."""
    from edgemoe import assets
    from edgemoe.api import load
    from edgemoe.evaluate import eval_tokens, perplexity

    with packed_everywhere(), load(model_dir) as eng:
        ctx = eng.model.args.max_position_embeddings
        ids = eval_tokens(eng.tokenizer, text, ctx, tokens, str(assets.HELDOUT_TEXT))
        ppl = perplexity(eng.model, ids, ctx, batch=8)
        win = torch.tensor(ids[: 4 * ctx]).view(4, ctx)
        with torch.inference_mode():
            logits = eng.model(win).float()  # (4, ctx, V)
    return ppl, logits


def quality(tokens: int | None, emit) -> None:
    from edgemoe import assets
    from edgemoe.api import load
    from edgemoe.evaluate import read_text
    from edgemoe.quant import kernels as K
    from edgemoe.store.convert import convert

    text = read_text(assets.HELDOUT_TEXT, "held-out text")
    with tempfile.TemporaryDirectory(prefix="resident-act-") as tmp:
        out = Path(tmp, "int4")
        convert(assets.MODEL_DIR, out, fmt="int4", resident="int8", force=True)
        res = {}
        for act in ("int16", "int8"):
            K.RESIDENT_ACTIVATIONS = act
            ppl, logits = heldout(out, text, tokens)
            with load(out) as eng:  # the default dispatch, only the resident activations switched
                greedy = [eng.generate(p, max_tokens=64, temperature=0).token_ids for p in PROMPTS]
            res[act] = (ppl, logits, greedy)
        K.RESIDENT_ACTIVATIONS = "int16"
    (p16, l16, g16), (p8, l8, g8) = res["int16"], res["int8"]
    d = l8 - l16
    lp16, lp8 = l16.log_softmax(-1), l8.log_softmax(-1)
    kl = float((lp16.exp() * (lp16 - lp8)).sum(-1).mean())
    top1 = float((l16.argmax(-1) == l8.argmax(-1)).float().mean())
    same = sum(a == b for a, b in zip(g16, g8))
    emit("## Quality (bundled model: int4 experts, int8 resident layers, bf16)")
    emit()
    emit(f"Held-out text `{assets.HELDOUT_TEXT.name}`, {p16['tokens']:,} tokens, with the packed C kernels "
         f"forced at every batch (the path decode takes; experts keep their default int8 activations in both "
         f"columns). Logits: the first 4 windows. Greedy: {len(PROMPTS)} prompts x 64 tokens with the default "
         f"dispatch; 'same' counts prompts whose tokens are identical.")
    emit()
    emit("| ppl int16 | ppl int8 | change | logits rel. RMS diff | top-1 agree | KL (nats) | greedy same |")
    emit("|---|---|---|---|---|---|---|")
    emit(f"| {p16['ppl']:.3f} | {p8['ppl']:.3f} | {100 * (p8['ppl'] / p16['ppl'] - 1):+.2f}% "
         f"| {float(d.norm() / l16.norm()):.2e} | {100 * top1:.2f}% | {kl:.2e} | {same}/{len(PROMPTS)} |")
    emit()


def _vs(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """Logits (..., V) against a reference: relative RMS difference, top-1 agreement, KL(ref || other)."""
    lr, lo = ref.log_softmax(-1), other.log_softmax(-1)
    kl = float((lr.exp() * (lr - lo)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == other.argmax(-1)).float().mean())
    return float((other - ref).norm() / ref.norm()), top1, kl


def _prefix(a: list[int], b: list[int]) -> int:
    """Tokens two greedy continuations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def resident_formats(tokens: int | None, emit) -> None:
    """The bundled model converted with int4 experts and each resident storage format
    (float, int8, int4), each compared with float in the same process."""
    from edgemoe import assets
    from edgemoe.api import load
    from edgemoe.evaluate import read_text
    from edgemoe.quant import kernels as K
    from edgemoe.store.convert import convert
    from edgemoe.store.manifest import read_manifest

    text = read_text(assets.HELDOUT_TEXT, "held-out text")
    kinds = ("float", "int8", "int4")
    res = {}
    with tempfile.TemporaryDirectory(prefix="resident-formats-") as tmp:
        for kind in kinds:
            out = Path(tmp, kind)
            convert(assets.MODEL_DIR, out, fmt="int4", resident=kind, force=True)
            m = read_manifest(out)
            ppl, logits = heldout(out, text, tokens)
            with load(out) as eng:  # the default dispatch
                greedy = [eng.generate(p, max_tokens=64, temperature=0, ignore_eos=True).token_ids for p in PROMPTS]
            layers = len(m.resident_int8) + len(m.resident_int4)
            res[kind] = (ppl, logits, greedy, m.resident_bytes, layers)
    p0, l0, g0, _, _ = res["float"]
    emit(f"`edgemoe convert --format int4 --resident float|int8|int4` of the bundled model; held-out text "
         f"`{assets.HELDOUT_TEXT.name}`, {p0['tokens']:,} tokens, packed C kernels forced at every batch (the decode "
         f"path). Activations: resident int8 layers {K.RESIDENT_ACTIVATIONS} (kernels.RESIDENT_ACTIVATIONS), "
         f"int4 layers and experts {K.ACTIVATIONS} (kernels.ACTIVATIONS). Logits: the first 4 windows, against "
         f"float. Greedy: {len(PROMPTS)} prompts x 64 tokens (EOS ignored) with the default dispatch; 'same' counts "
         f"prompts identical to float's, 'agree' is the share of the 64 tokens before the first difference "
         f"(mean over prompts). Resident bytes: resident.safetensors (this model ties its LM head to the "
         f"embedding, which stays float, so the quantized layers are the attention projections only).")
    emit()
    emit("| resident | layers | resident bytes | ppl | change | logits rel. RMS diff | top-1 agree | KL (nats) "
         "| greedy same | greedy agree |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        p, lg, g, nbytes, layers = res[kind]
        rms, top1, kl = _vs(l0, lg)
        same = sum(a == b for a, b in zip(g0, g))
        agree = statistics.mean(_prefix(a, b) / len(a) for a, b in zip(g0, g))
        emit(f"| {kind} | {layers} | {nbytes:,} | {p['ppl']:.3f} | {100 * (p['ppl'] / p0['ppl'] - 1):+.2f}% "
             f"| {rms:.2e} | {100 * top1:.2f}% | {kl:.2e} | {same}/{len(PROMPTS)} | {100 * agree:.1f}% |")
    emit()


def layer_speed(emit, shapes=((2048, 2048), (2048, 512)), rounds: int = 7, calls: int = 200) -> None:
    """One resident layer at batch 1 (decode) on random weights: bf16 nn.Linear, Int8Linear,
    Int4Linear, the three alternating in every round; median microseconds per call."""
    from torch import nn

    from edgemoe.quant.linear import Int4Linear, Int8Linear

    emit(f"Layer speed, batch 1, bf16 activations, random weights of the bench model's attention shapes (K, N); "
         f"{rounds} rounds of {calls} calls, the three layers alternating; median us per call; torch threads "
         f"{torch.get_num_threads()}. Bytes: what the layer holds.")
    emit()
    emit("| K x N | bf16 us | int8 us | int4 us | int8 / int4 time | bf16 bytes | int8 bytes | int4 bytes |")
    emit("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        lin = nn.Linear(k, n, bias=False).requires_grad_(False)
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        lin = lin.bfloat16()
        layers = {"bf16": lin, "int8": Int8Linear.from_linear(lin), "int4": Int4Linear.from_linear(lin)}
        x = torch.randn(1, k, generator=gen).bfloat16()
        t = {name: [] for name in layers}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, m in layers.items():
                    for _ in range(calls // 10):
                        m(x)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        m(x)
                    t[name].append((time.perf_counter() - t0) / calls * 1e6)
        med = {name: statistics.median(v) for name, v in t.items()}
        nb = {name: sum(b.nbytes for b in m.state_dict().values()) for name, m in layers.items()}
        emit(f"| {k} x {n} | {med['bf16']:.1f} | {med['int8']:.1f} | {med['int4']:.1f} | "
             f"{med['int8'] / med['int4']:.2f}x | {nb['bf16']:,} | {nb['int8']:,} | {nb['int4']:,} |")
    emit()


def speed(model: str, rounds: int, tokens: int, threads: int | None, emit) -> None:
    from edgemoe.api import load
    from edgemoe.quant import kernels as K

    times = {"int16": [], "int8": []}
    ratios = []
    with load(model, threads=threads) as eng:
        eng.generate(PROMPTS[0], max_tokens=8, ignore_eos=True)
        for r in range(rounds):
            order = ("int16", "int8") if r % 2 == 0 else ("int8", "int16")
            got = {}
            for act in order:
                K.RESIDENT_ACTIVATIONS = act
                res = eng.generate(PROMPTS[0], max_tokens=tokens, ignore_eos=True)
                got[act] = res.stats.decode_tps if hasattr(res.stats, "decode_tps") else res.stats["decode_tps"]
                times[act].append(got[act])
            ratios.append(got["int8"] / got["int16"])
        K.RESIDENT_ACTIVATIONS = "int16"
    emit(f"## Speed ({model})")
    emit()
    emit(f"Decode tokens/s, {tokens} tokens per run, {rounds} rounds, the two paths alternating (order rotated); "
         f"torch threads {torch.get_num_threads()}.")
    emit()
    emit("| int16 tok/s (median) | int8 tok/s (median) | int8 / int16 per round: median [min-max] |")
    emit("|---|---|---|")
    emit(f"| {statistics.median(times['int16']):.2f} | {statistics.median(times['int8']):.2f} "
         f"| {statistics.median(ratios):.3f}x [{min(ratios):.3f}-{max(ratios):.3f}] |")
    emit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a converted model with int8 resident layers, for the speed rows")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per speed run")
    ap.add_argument("--threads", type=int, default=None, help="threads for the speed rows (default: torch's)")
    ap.add_argument("--acc-tokens", type=int, default=None, help="held-out tokens (default: all)")
    ap.add_argument("--resident-formats", action="store_true",
                    help="compare resident float / int8 / int4 on the bundled model instead, appending to -o")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    lines: list[str] = []

    def emit(s: str = "") -> None:
        lines.append(s)
        print(s, flush=True)

    from edgemoe.quant.native import isa

    if args.resident_formats:
        if args.model:
            ap.error("--resident-formats runs on the bundled model; --model is for the speed rows")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        emit()
        emit("## Resident weights float vs int8 vs int4 (bundled model: int4 experts, bf16)")
        emit()
        emit(f"Generated by `python -m edgemoe_lab.experiments.resident_act {' '.join(argv or sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {cpu_model()}, {os.cpu_count()} CPUs, "
             f"edgemoe kernels: {isa()}; torch threads {torch.get_num_threads()}; load average "
             f"{os.getloadavg()[0]:.1f}.")
        emit()
        resident_formats(args.acc_tokens, emit)
        if args.threads is not None:
            torch.set_num_threads(args.threads)  # load() picked its own for the small model
        layer_speed(emit)
        old = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(old + "\n".join(lines) + "\n")
        return 0

    emit("# Resident int8 layers: int8 vs int16 activations")
    emit()
    emit(f"Generated by `python -m edgemoe_lab.experiments.resident_act {' '.join(argv or sys.argv[1:])}` on "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {cpu_model()}, {os.cpu_count()} CPUs, "
         f"edgemoe kernels: {isa()}; load average {os.getloadavg()[0]:.1f}.")
    emit()
    quality(args.acc_tokens, emit)
    if args.model:
        speed(args.model, args.rounds, args.tokens, args.threads, emit)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
