"""Decode speed of edgemoe vs transformers' own `generate`, side by side, on the same
random Mixtral-shaped checkpoint (about 1.1 B parameters, bf16), everything in RAM.

    python -m edgemoe_lab.experiments.decode_vs_transformers --tokens 64 --repeats 3

Each measurement runs in a fresh subprocess (so peak RSS is per engine); the engines
alternate and the medians are reported with min and max. Writes
edgemoe_lab/results/decode_vs_transformers.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgemoe_lab import paths

WORK = paths.WORK
RESULTS = paths.RESULTS

# ~1.1 B parameters, experts are ~90% of them (edgemoe_lab.checkpoints writes it: bf16, the
# bundled model's tokenizer, 4096 positions, untied embeddings).
CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=16,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
)


def make_checkpoint(path: Path) -> None:
    """The random checkpoint of CONFIG's shape (written once), with the lab's writer and
    the bundled model's tokenizer; the prompt is token ids, so the tokenizer only has to load."""
    from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral

    spec = MixtralSpec(layers=CONFIG["num_hidden_layers"], experts=CONFIG["num_local_experts"],
                       top_k=CONFIG["num_experts_per_tok"], hidden=CONFIG["hidden_size"],
                       inter=CONFIG["intermediate_size"], heads=CONFIG["num_attention_heads"],
                       kv_heads=CONFIG["num_key_value_heads"], head_dim=CONFIG["hidden_size"] // CONFIG["num_attention_heads"])
    write_random_mixtral(path, spec, vocab_size=CONFIG["vocab_size"])


def run_edgemoe(path: str, prompt: list[int], tokens: int) -> dict:
    import edgemoe
    from edgemoe.generate import peak_rss_bytes

    engine = edgemoe.load(path)
    engine.generate(prompt, max_tokens=4, ignore_eos=True)  # warm-up
    r = engine.generate(prompt, max_tokens=tokens, ignore_eos=True)
    return {"decode_tok_s": r.stats.decode_tps, "prefill_s": r.stats.prefill_s, "token_ids": r.token_ids,
            "peak_rss_bytes": peak_rss_bytes()}


def run_transformers(path: str, prompt: list[int], tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from edgemoe.generate import peak_rss_bytes

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        clock = Clock()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=clock, **kw)
    # put() #0 is the prompt, #1 the first new token; decode rate over the rest, as edgemoe reports it.
    decode_s = clock.times[-1] - clock.times[1]
    return {"decode_tok_s": (tokens - 1) / decode_s, "prefill_s": clock.times[1] - clock.times[0],
            "token_ids": out[0, len(prompt):].tolist(), "peak_rss_bytes": peak_rss_bytes()}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    prompt = json.loads(args.prompt)
    fn = run_edgemoe if args.engine == "edgemoe" else run_transformers
    print("RESULT " + json.dumps(fn(args.model, prompt, args.tokens)))


def measure(engine: str, model: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--child", engine, "--model", str(model), "--prompt", json.dumps(prompt),
           "--tokens", str(tokens), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["edgemoe", "transformers"])
    p.add_argument("--model")
    p.add_argument("--prompt")
    args = p.parse_args()
    if args.child:
        args.engine = args.child
        return child(args)

    model = WORK / "mixtral-1b-bf16"
    WORK.mkdir(parents=True, exist_ok=True)
    make_checkpoint(model)
    prompt = list(range(100, 132))  # 32 fixed token ids
    runs: dict[str, list[dict]] = {"edgemoe": [], "transformers": []}
    for i in range(args.repeats):
        for engine in (("edgemoe", "transformers") if i % 2 == 0 else ("transformers", "edgemoe")):
            r = measure(engine, model, prompt, args.tokens, args.threads)
            runs[engine].append(r)
            print(f"run {i} {engine:12s} decode {r['decode_tok_s']:.2f} tok/s  peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB",
                  flush=True)
    summary = {}
    for engine, rs in runs.items():
        tps = [r["decode_tok_s"] for r in rs]
        summary[engine] = {"decode_tok_s_median": statistics.median(tps), "min": min(tps), "max": max(tps),
                           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                           "prefill_s_median": statistics.median(r["prefill_s"] for r in rs)}
    ratio = summary["edgemoe"]["decode_tok_s_median"] / summary["transformers"]["decode_tok_s_median"]
    a, b = runs["edgemoe"][0]["token_ids"], runs["transformers"][0]["token_ids"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    command = f"python -m edgemoe_lab.experiments.decode_vs_transformers --tokens {args.tokens} --repeats {args.repeats} --threads {args.threads}"
    H, L, E = CONFIG["hidden_size"], CONFIG["num_hidden_layers"], CONFIG["num_local_experts"]
    head_dim = H // CONFIG["num_attention_heads"]
    attention = L * (2 * H * H + 2 * H * CONFIG["num_key_value_heads"] * head_dim)  # q, o + k, v
    n_params = (CONFIG["vocab_size"] * H * 2 + attention + L * E * H  # embeddings, lm_head, attention, routers
                + L * E * 3 * H * CONFIG["intermediate_size"])  # experts
    # Weight bytes one decode step must read: attention, routers, top-k experts per layer, LM head (bf16).
    active = 2 * (attention + L * E * H + L * CONFIG["num_experts_per_tok"] * 3 * H * CONFIG["intermediate_size"]
                  + CONFIG["vocab_size"] * H)
    for s in summary.values():
        s["weight_gb_s"] = active * s["decode_tok_s_median"] / 1e9
    doc = {
        "command": command, "active_weight_bytes_per_token": active, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "model": {"config": CONFIG, "approx_params": n_params, "dtype": "bfloat16"}, "tokens": args.tokens,
        "summary": summary, "ratio_edgemoe_over_transformers": ratio, "greedy_tokens_agree_prefix": agree,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "token_ids"} for r in v] for k, v in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_vs_transformers.json").write_text(json.dumps(doc, indent=2))
    rows = "\n".join(
        f"| {e} | {s['decode_tok_s_median']:.2f} ({s['min']:.2f}–{s['max']:.2f}) | {s['weight_gb_s']:.1f} | "
        f"{s['prefill_s_median']:.3f} | {s['peak_rss_bytes'] / 1e9:.2f} |" for e, s in summary.items()
    )
    (RESULTS / "decode_vs_transformers.md").write_text(
        f"# Decode speed: edgemoe vs transformers (all in RAM, bf16)\n\n"
        f"Command: `{command}`\n\n"
        f"Model: random Mixtral-shaped checkpoint, ~{n_params / 1e9:.2f} B parameters, bf16, "
        f"{CONFIG['num_hidden_layers']} layers x {CONFIG['num_local_experts']} experts, top-{CONFIG['num_experts_per_tok']}. "
        f"Prompt 32 tokens, {args.tokens} generated tokens, greedy. {args.repeats} runs per engine, alternating, "
        f"each in a fresh process, {args.threads} threads.\n\n"
        f"| engine | decode tok/s, median (min–max) | weight GB/s | prefill s | peak RSS GB |\n|---|---|---|---|---|\n{rows}\n\n"
        f"**edgemoe / transformers decode speed: {ratio:.2f}x** (goal: >= 1.5x: "
        f"{'met' if ratio >= 1.5 else 'not met'})\n\n"
        f"Weight GB/s = the {active / 1e6:.0f} MB of bf16 weights one decode step reads (attention, routers, top-k "
        f"experts, LM head) x tokens/s. Batch-1 decode is a chain of matrix-vector products bound by how fast the CPU "
        f"streams bf16 weights through its matmul kernel; both engines call the same torch (oneDNN/MKL) bf16 kernels "
        f"for these weights, so once edgemoe's Python-side overhead is gone the remaining gap is small. On this "
        f"2-core AVX2 CPU (no native bf16 arithmetic) bf16 matvec tops out near the rates in the table "
        f"(edgemoe_lab/results/quant_kernels.md: bf16 9.3-9.5 GB/s per core). The larger speedups come from the "
        f"quantized formats (same file: int4/int8 kernels) and, out of RAM, from the expert store.\n\n"
        f"Greedy tokens agree for the first {agree} of {len(a)} tokens (bf16 rounding differs between the two "
        f"implementations, so long greedy runs on random weights may drift; fp32 equality is tested in tests/models).\n"
    )
    print(f"edgemoe/transformers = {ratio:.2f}x")


if __name__ == "__main__":
    main()
