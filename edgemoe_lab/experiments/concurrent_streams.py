"""Concurrent streams over HTTP: do 4 streams get more aggregate tokens/s than one?

    python -m edgemoe_lab.experiments.concurrent_streams [--rounds 5] [--tokens 64] [--threads-bench 1] [--wait-quiet 120]

`edgemoe serve --parallel 4` (each model in its own server process), then for 1, 2 and 4
concurrent clients: each client streams one completion (SSE, greedy, EOS ignored,
`--tokens` tokens, a different prompt per client). Per level: aggregate tokens/s (all
tokens over the wall time from the first request to the last token), the server's CPU
seconds over the same span (tokens per CPU second: what the streams cost, whatever else
the machine runs), time to first token and inter-token latency per stream, and the
server's peak RSS (sampled every 20 ms). The levels alternate within each round and the
order rotates between rounds; medians over rounds are reported, and the ratios to one
stream are taken within each round.

Models:
    bundled   the bundled tiny model (edgemoe/assets/tiny-moe), engine defaults
    mixtral   a random-weight Mixtral-shaped bf16 checkpoint in RAM, written by
              edgemoe_lab.checkpoints (8 layers x 8 experts top-2, hidden 1024, expert
              intermediate 2816: 0.58 B parameters), the shape edgemoe_lab/experiments/verify_cost.py uses

Then, in-process, one decode step at batch 1 and at batch 4 (`--profile`): CPU time by
part of the model, distinct experts per layer, weight bytes read per step, and the bound
that memory reads put on the gain; and the matmul kernels at 1, 2 and 4 rows. Also the
tokens of each prompt run alone against the same prompt among 4 (greedy agreement).

Writes edgemoe_lab/results/concurrent.md and concurrent.json; the checkpoint goes to
edgemoe_lab/work/concurrent/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgemoe_lab import paths
from edgemoe_lab.peer.machine import cpu_model

ROOT = paths.ROOT
WORK = paths.WORK / "concurrent"
RESULTS = paths.RESULTS
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class Stack:\n    def __init__(self):\n        self.items",
    "import os\nimport sys\n\ndef main(argv):\n    for",
    "The quick brown fox jumps over the lazy dog. Mixture of experts",
]
LEVELS = (1, 2, 4)
PARALLEL = 4
SPEC = dict(layers=8, experts=8, top_k=2, hidden=1024, inter=2816, heads=16, kv_heads=4, head_dim=64)


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgemoe serve` in a subprocess, with its CPU time and RSS read from /proc."""

    def __init__(self, model: str | None, extra: list[str]):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "edgemoe", "serve", *([model] if model else []), "--port", str(self.port),
                    "--parallel", str(PARALLEL), *extra]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        import requests

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads

    def thread_cpu_s(self) -> dict[int, float]:
        """CPU seconds of each thread of the server (utime + stime), by thread id."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def hwm(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream(url: str, prompt: str, tokens: int) -> dict:
    """One streamed completion: start, first-token and end times, chunk times, tokens, text."""
    import requests

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks, text, usage = [], "", None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for c in event["choices"]:
                if c.get("text"):
                    chunks.append(time.perf_counter())
                    text += c["text"]
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(chunks)
    first = chunks[0] if chunks else end
    gaps = [b - a for a, b in zip(chunks, chunks[1:])]
    return {"start": t0, "first": first, "end": end, "tokens": n, "text": text, "ttft_s": first - t0,
            "itl_s": (end - first) / (n - 1) if n > 1 else 0.0, "gaps": gaps}


def run_level(server: Server, c: int, tokens: int, round_no: int) -> dict:
    """c concurrent streams; the server's RSS sampled meanwhile."""
    results: list = [None] * c
    prompts = [PROMPTS[(round_no + i) % len(PROMPTS)] for i in range(c)]
    peak, done = [server.rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss())
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0, tcpu0 = server.cpu_s(), server.thread_cpu_s()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(server.url, prompts[i], tokens)))
               for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = server.cpu_s() - cpu0
    tcpu = server.thread_cpu_s()
    per_thread = sorted((tcpu[t] - tcpu0.get(t, 0.0) for t in tcpu), reverse=True)
    busiest = per_thread[0] if per_thread else 0.0  # the batch scheduler's thread: the model's work
    done.set()
    sampler.join()
    total = sum(r["tokens"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {
        "streams": c, "tokens": total, "wall_s": wall, "cpu_s": cpu, "tok_s": total / wall,
        "tok_per_cpu_s": total / cpu if cpu > 0 else 0.0, "peak_rss_bytes": peak[0],
        "scheduler_cpu_s": busiest, "other_cpu_s": max(0.0, cpu - busiest),
        "ttft_s": statistics.median(r["ttft_s"] for r in results),
        "itl_s": statistics.median(r["itl_s"] for r in results),
        "gap_p90_s": gaps[int(0.9 * (len(gaps) - 1))] if gaps else 0.0,
        "per_stream_tok_s": statistics.median((r["tokens"] - 1) / (r["end"] - r["first"]) for r in results
                                              if r["end"] > r["first"] and r["tokens"] > 1),
    }


def agreement(server: Server, tokens: int) -> list[dict]:
    """Each prompt alone, then the 4 together: the same text? (greedy)"""
    alone = [stream(server.url, p, tokens)["text"] for p in PROMPTS]
    together: list = [None] * len(PROMPTS)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, stream(server.url, PROMPTS[i], tokens)))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = []
    for a, t in zip(alone, together):
        t = t["text"]
        same = next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), min(len(a), len(t)))
        out.append({"identical": a == t, "chars": len(a), "first_difference_at_char": None if a == t else same})
    return out


def bench_model(name: str, model: str | None, extra: list[str], rounds: int, tokens: int) -> dict:
    server = Server(model, extra)
    try:
        load_rss = server.rss()
        stream(server.url, PROMPTS[0], 8)  # warm-up
        per_round = []
        for r in range(rounds):
            order = LEVELS[r % len(LEVELS):] + LEVELS[: r % len(LEVELS)]
            levels = {c: run_level(server, c, tokens, r) for c in order}
            per_round.append(levels)
            print(f"  {name} round {r + 1}: " + ", ".join(f"{c}: {levels[c]['tok_s']:.1f} tok/s" for c in LEVELS),
                  flush=True)
        agree = agreement(server, tokens)
        hwm = server.hwm()
    finally:
        server.stop()
    summary = {}
    for c in LEVELS:
        rows = [pr[c] for pr in per_round]
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "streams"}
        med["ratio_tok_s"] = statistics.median(pr[c]["tok_s"] / pr[1]["tok_s"] for pr in per_round)
        med["ratio_tok_per_cpu_s"] = statistics.median(pr[c]["tok_per_cpu_s"] / pr[1]["tok_per_cpu_s"]
                                                       for pr in per_round)
        med["ratio_range"] = [min(pr[c]["tok_s"] / pr[1]["tok_s"] for pr in per_round),
                              max(pr[c]["tok_s"] / pr[1]["tok_s"] for pr in per_round)]
        summary[c] = med
    return {"name": name, "command": " ".join(server.cmd[1:]).replace(str(server.port), "PORT"),
            "rounds": per_round, "summary": summary, "agreement": agree, "load_rss_bytes": load_rss,
            "peak_rss_bytes": hwm}


# ----------------------------------------------------------------------------- in-process profile


def profile(model: str | None, threads: int | None, steps: int) -> dict:
    """One decode step at batch 1 (the single-sequence path) and batch 4 (rows, the kernel):
    CPU time per part, distinct experts, weight bytes read."""
    import torch

    import edgemoe
    from edgemoe.batching import decode_rows
    from edgemoe.generate import PromptCache, prefill

    engine = edgemoe.load(model, parallel=PARALLEL, threads=threads)
    m = engine.model
    clock = time.process_time
    acc: dict = {}
    experts: list = []

    def timer(name):
        def pre(mod, args):
            mod._t0 = clock()

        def post(mod, args, out):
            acc[name] = acc.get(name, 0.0) + clock() - mod._t0
        return pre, post

    for layer in m.layers:
        for name, mod in (("attention", layer.attn), ("moe", layer.mlp), ("norms", layer.norm1),
                          ("norms", layer.norm2)):
            pre, post = timer(name)
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    blocks = list(m.moe_blocks())
    for b in blocks:
        b.hook = lambda layer, ids, w, lg: experts.append(len(set(ids.reshape(-1).tolist()) - {-1}))
    args = m.args
    elem = m.embed.weight.element_size()
    expert_bytes = 3 * args.hidden_size * args.expert_dim * elem
    resident = sum(p.nbytes for p in m.parameters()) - (0 if args.tie_word_embeddings else m.embed.weight.nbytes)
    out = {"threads": torch.get_num_threads(), "expert_bytes": expert_bytes, "resident_read_bytes": resident}
    # (key, rows, rowmm kernel): "native" is one sequence on torch's kernels (Engine.generate's
    # step); 1 and 4 are the scheduler's steps (the server's 1 and 4 streams).
    for key, B, kernel in (("native", 1, False), (1, 1, True), (PARALLEL, PARALLEL, True)):
        ctx = min(512, args.max_position_embeddings)
        caches = [PromptCache(m, ctx) for _ in range(B)]
        toks = []
        for c, p in zip(caches, PROMPTS):
            toks.append(int(prefill(m, engine.tokenizer.encode(p), c, onednn=False)[0, -1].argmax()))
        for _ in range(3):
            toks = decode_rows(m, toks, caches, kernel).argmax(-1).tolist()
        acc.clear()
        experts.clear()
        times = []
        for _ in range(steps):
            t = clock()
            toks = decode_rows(m, toks, caches, kernel).argmax(-1).tolist()
            times.append(clock() - t)
        step = statistics.median(times)
        parts = {k: v / steps for k, v in acc.items()}
        parts["rest (embedding, final norm, LM head, sampling setup)"] = max(0.0, step - sum(parts.values()))
        distinct = statistics.mean(experts) if experts else 0.0
        out[key] = {"step_s": step, "per_token_s": step / B, "parts_s": parts, "distinct_experts_per_layer": distinct,
                    "bytes_per_step": resident + len(blocks) * distinct * expert_bytes}
    b1, b4 = out[1], out[PARALLEL]
    out["measured_ratio"] = PARALLEL * b1["step_s"] / b4["step_s"]
    out["measured_ratio_vs_native"] = PARALLEL * out["native"]["step_s"] / b4["step_s"]
    out["memory_bound_ratio"] = PARALLEL * b1["bytes_per_step"] / b4["bytes_per_step"]
    engine.close()
    return out


def kernels(threads: int) -> list[dict]:
    """x (rows, K) @ W^T for the bench model's expert shapes, 6 weights taken in turn (as a
    decode step reads them: none stays in cache), CPU time per call."""
    import torch
    import torch.nn.functional as F

    from edgemoe import rowmm

    torch.set_num_threads(threads)
    prev = torch._C._get_mkldnn_enabled()
    rows = []
    for N, K in ((2 * SPEC["inter"], SPEC["hidden"]), (SPEC["hidden"], SPEC["inter"]), (128, 128), (512, 128)):
        ws = [torch.randn(N, K).bfloat16() for _ in range(6)]
        reps = 3 if N * K > 1e6 else 50
        for M in (1, 2, 4):
            x = torch.randn(M, K).bfloat16()
            entry = {"shape": [N, K], "rows": M}
            for label, fn, onednn in (("native", lambda w: F.linear(x, w), False),
                                      ("onednn", lambda w: F.linear(x, w), True),
                                      ("rowmm", lambda w: rowmm.rows_matmul(x, w), False)):
                torch._C._set_mkldnn_enabled(onednn)
                best = float("inf")
                for _ in range(5):
                    t = time.process_time()
                    for _ in range(reps):
                        for w in ws:
                            fn(w)
                    best = min(best, (time.process_time() - t) / (reps * len(ws)))
                entry[label + "_us"] = best * 1e6
            rows.append(entry)
    torch._C._set_mkldnn_enabled(prev)
    return rows


# ----------------------------------------------------------------------------- report


def wait_quiet(limit: float) -> float:
    """Wait up to `limit` seconds for the 1-minute load average to drop below 1.5."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and os.getloadavg()[0] >= 1.5:
        time.sleep(5)
    return os.getloadavg()[0]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def markdown(meta: dict, models: list[dict], profiles: dict, kern: list[dict]) -> str:
    L = ["# Concurrent streams: aggregate throughput over HTTP", "",
         f"Generated by `{meta['command']}` on {meta['date']}.", "",
         f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; load average "
         f"{meta['load_before']:.1f} before and {meta['load_after']:.1f} after (a shared machine: other jobs ran "
         "meanwhile, so wall-clock figures are noisy; tokens per server CPU second are not affected by waiting "
         f"for a core). Row kernel: {meta['rowmm']}.", "",
         "Each level runs its streams concurrently against one `edgemoe serve --parallel 4` process: streamed "
         f"completions of {meta['tokens']} tokens each (greedy, EOS ignored, a different prompt per stream). "
         f"Medians over {meta['rounds']} rounds; the ratios are to one stream within the same round (range in "
         "brackets). TTFT: time to first token; ITL: inter-token latency of one stream (its decode time / "
         "tokens); p90 gap: 90th percentile of the gaps between streamed chunks; peak RSS: the server's, sampled "
         "every 20 ms during the level. CPU per token: the busiest thread (the scheduler's, which runs the "
         "model) and all the others (HTTP handler threads, and torch's OpenMP workers when it runs more than one "
         "thread).", ""]
    for m in models:
        L += [f"## {m['title']}", "", f"`{m['command']}`", "",
              "| streams | aggregate tok/s | ratio | tok / server CPU s | ratio | per-stream tok/s | TTFT | ITL | "
              "p90 gap | peak RSS | CPU per token: busiest thread + the others |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in LEVELS:
            s = m["summary"][c]
            lo, hi = s["ratio_range"]
            L.append(f"| {c} | {s['tok_s']:.1f} | {s['ratio_tok_s']:.2f}x [{lo:.2f}-{hi:.2f}] | "
                     f"{s['tok_per_cpu_s']:.1f} | {s['ratio_tok_per_cpu_s']:.2f}x | {s['per_stream_tok_s']:.1f} | "
                     f"{1e3 * s['ttft_s']:.0f} ms | {1e3 * s['itl_s']:.1f} ms | {1e3 * s['gap_p90_s']:.1f} ms | "
                     f"{gb(s['peak_rss_bytes'])} | {1e3 * s['scheduler_cpu_s'] / s['tokens']:.2f} + "
                     f"{1e3 * s['other_cpu_s'] / s['tokens']:.2f} ms |")
        same = sum(a["identical"] for a in m["agreement"])
        diffs = [a["first_difference_at_char"] for a in m["agreement"] if not a["identical"]]
        L += ["", f"Server RSS after loading {gb(m['load_rss_bytes'])}, peak {gb(m['peak_rss_bytes'])}. Greedy "
              f"agreement, each prompt alone vs the four together: {same}/{len(m['agreement'])} identical"
              + (f" (the others first differ at characters {diffs})" if diffs else "") + ".", ""]
    L += ["## Where a decode step's time goes: batch 1 vs batch 4", "",
          "In-process, the scheduler's decode step (batching.decode_rows) for 1 sequence and for 4 (one forward of "
          "4 rows: models/rows.py; bf16 matmuls on edgemoe.rowmm's kernel in both, as the server runs them), and, "
          "for reference, one sequence on torch's native kernels (the step Engine.generate runs). CPU time per step "
          "(median), by the modules' forward hooks; bytes per step = resident weights read (all but the embedding "
          "table) + distinct experts x one expert's bytes per MoE layer.", ""]
    for name, p in profiles.items():
        b1, b4 = p[1], p[PARALLEL]
        keys = list(b4["parts_s"])
        L += [f"### {name} ({p['threads']} thread{'s' if p['threads'] > 1 else ''})", "",
              "| | batch 1 | batch 4 | batch 4 / batch 1 |", "|---|---|---|---|",
              f"| step (CPU) | {1e3 * b1['step_s']:.2f} ms | {1e3 * b4['step_s']:.2f} ms | "
              f"{b4['step_s'] / b1['step_s']:.2f}x |",
              f"| (batch 1 on torch's native kernels) | {1e3 * p['native']['step_s']:.2f} ms | | |"]
        for k in keys:
            a, b = b1["parts_s"].get(k, 0.0), b4["parts_s"][k]
            L.append(f"| {k} | {1e3 * a:.2f} ms | {1e3 * b:.2f} ms | {b / a if a else float('nan'):.2f}x |")
        L += [f"| distinct experts per MoE layer | {b1['distinct_experts_per_layer']:.2f} | "
              f"{b4['distinct_experts_per_layer']:.2f} | {b4['distinct_experts_per_layer'] / max(b1['distinct_experts_per_layer'], 1e-9):.2f}x |",
              f"| weight bytes read per step | {gb(b1['bytes_per_step'])} | {gb(b4['bytes_per_step'])} | "
              f"{b4['bytes_per_step'] / b1['bytes_per_step']:.2f}x |", "",
              f"Tokens per CPU second, 4 rows vs 1: **{p['measured_ratio']:.2f}x** ({p['measured_ratio_vs_native']:.2f}x "
              f"against one sequence on torch's native kernels). If a step cost only its weight "
              f"reads, 4 rows would give {p['memory_bound_ratio']:.2f}x: 4 tokens for "
              f"{b4['bytes_per_step'] / b1['bytes_per_step']:.2f}x the bytes.", ""]
    L += ["## Matmul kernels at 1, 2 and 4 rows", "",
          "CPU time per call of x (rows, K) @ W^T, bf16, one thread, six weights taken in turn (a decode step "
          "reads each weight once, so none stays in cache): torch native (what decode uses), oneDNN, and "
          "edgemoe.rowmm (what batched steps use).", "",
          "| W (N x K) | rows | native | oneDNN | rowmm |", "|---|---|---|---|---|"]
    for k in kern:
        L.append(f"| {k['shape'][0]} x {k['shape'][1]} | {k['rows']} | {k['native_us']:.0f} us | "
                 f"{k['onednn_us']:.0f} us | {k['rowmm_us']:.0f} us |")
    L += ["", "## Reading the results", "", *meta["reading"], ""]
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads-bench", default="0", metavar="N[,N...]",
                    help="--threads for the bench model's server, one run per value (0: the engine's choice; "
                         "default 0)")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--models", default="bundled,mixtral", help="which models, comma-separated (default: both)")
    ap.add_argument("--from-json", action="store_true",
                    help="only rewrite concurrent.md from edgemoe_lab/results/concurrent.json (no measurement)")
    opts = ap.parse_args()
    if opts.from_json:
        data = json.loads((RESULTS / "concurrent.json").read_text())
        models, profiles = data["models"], _int_keys(data["profiles"])
        for m in models:
            m["summary"] = {int(k): v for k, v in m["summary"].items()}
        data["meta"]["reading"] = reading(models, profiles)
        (RESULTS / "concurrent.md").write_text(markdown(data["meta"], models, profiles, data["kernels"]))
        return 0

    import torch

    from edgemoe import rowmm
    from edgemoe_lab.checkpoints import MixtralSpec, write_random_mixtral

    load_before = wait_quiet(opts.wait_quiet)
    meta = {"command": "python -m edgemoe_lab.experiments.concurrent_streams " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "rounds": opts.rounds, "tokens": opts.tokens, "load_before": load_before,
            "rowmm": rowmm.simd()}
    models, profiles = [], {}
    which = opts.models.split(",")
    if "bundled" in which:
        print("bundled model", flush=True)
        r = bench_model("bundled", None, [], opts.rounds, opts.tokens)
        r["title"] = "Bundled model (tiny-moe: 8 layers x 8 experts top-2, hidden 128, bf16, 14.7 MB)"
        models.append(r)
        profiles["bundled"] = profile(None, None, opts.profile_steps)
    if "mixtral" in which:
        spec = MixtralSpec(**SPEC)
        path = write_random_mixtral(WORK / "mixtral-0.6b", spec)
        for threads in (int(t) for t in opts.threads_bench.split(",")):
            extra = ["--threads", str(threads)] if threads else []
            label = f"bench model, {threads} thread{'s' if threads > 1 else ''}" if threads else "bench model"
            print(label, flush=True)
            r = bench_model(label, str(path.relative_to(ROOT)), extra, opts.rounds, opts.tokens)
            r["title"] = (f"Bench model in RAM, {'--threads ' + str(threads) if threads else 'default threads'} "
                          f"({spec.describe(4096)})")
            models.append(r)
            profiles[label] = profile(str(path), threads or None, max(5, opts.profile_steps // 3))
    kern = kernels(1)
    meta["load_after"] = os.getloadavg()[0]
    meta["reading"] = reading(models, profiles)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "concurrent.json").write_text(json.dumps({"meta": meta, "models": models, "profiles": profiles,
                                                         "kernels": kern}, indent=1, default=str))
    (RESULTS / "concurrent.md").write_text(markdown(meta, models, profiles, kern))
    print((RESULTS / "concurrent.md").read_text())
    return 0


def _http_cost(models: list[dict], profiles: dict) -> str:
    """What HTTP costs the bundled model: its in-process step ratio against the server's."""
    m = next((m for m in models if m["name"] == "bundled"), None)
    p = profiles.get("bundled")
    if m is None or p is None:
        return ""
    s = m["summary"][4]
    return (f" (bundled model: {p['measured_ratio']:.2f}x in-process, {s['ratio_tok_per_cpu_s']:.2f}x per server "
            f"CPU second and {s['ratio_tok_s']:.2f}x wall-clock over HTTP)")


def _int_keys(profiles: dict) -> dict:
    """JSON turned the batch sizes keying each profile into strings: back to ints."""
    return {name: {int(k) if k.isdigit() else k: v for k, v in p.items()} for name, p in profiles.items()}


def reading(models: list[dict], profiles: dict) -> list[str]:
    """The conclusions, from the numbers of this run."""
    out = []
    for m in models:
        s = m["summary"][4]
        verdict = "meets" if s["ratio_tok_s"] >= 2.5 else "misses"
        out.append(f"- {m['name']}: 4 streams give {s['ratio_tok_s']:.2f}x the aggregate tokens/s of one "
                   f"({s['ratio_tok_per_cpu_s']:.2f}x per server CPU second): {verdict} the 2.5x goal.")
    for name, p in profiles.items():
        b1, b4 = p[1], p[PARALLEL]
        out.append(f"- {name}: a step of 4 rows reads {b4['distinct_experts_per_layer']:.1f} distinct experts per "
                   f"layer against {b1['distinct_experts_per_layer']:.1f} for one row (8 experts, top-2: four "
                   f"unrelated tokens share few), {b4['bytes_per_step'] / b1['bytes_per_step']:.2f}x the weight "
                   f"bytes; reads alone would allow {p['memory_bound_ratio']:.2f}x, and the step measured "
                   f"{p['measured_ratio']:.2f}x."
                   + (" (CPU time of every thread: with 2 threads on this busy 2-core machine it counts the OpenMP "
                      "workers' waiting too, so read the 1-thread profile.)" if p["threads"] > 1 else ""))
    out += [
        "- Why 2.5x is missed: a shared step saves only the weights its rows share. Resident weights (attention, "
        "norms, router, LM head) are read once for 4 rows, but experts are per token: with 8 experts top-2, 4 "
        "unrelated tokens route to 5-5.4 distinct experts per layer (8 x (1 - (6/8)^4) = 5.47 for uniform "
        "routing) where one token routes to 2, so a step of 4 reads 1.9x (bundled) to 2.4x (bench model) the "
        "bytes of a step of one, and the kernels make a step cost about its bytes (the matmul table: rowmm's "
        "4-row call costs 1.0-1.5x its 1-row call; torch's native bf16 kernel costs 3-4.6x, oneDNN reorders "
        "each weight on every call). The measured steps sit at that bound. Over HTTP the model thread's share "
        "is the same; the request threads add 0.1-0.3 ms of CPU per token and, on 2 shared cores, wait for the "
        "GIL and a core" + _http_cost(models, profiles) + ".",
        "- More experts do not help: with E experts and top-k, 4 tokens read about E x (1 - (1 - k/E)^4) distinct "
        "experts, nearly 4k when k/E is small (Qwen3-30B-A3B, 128 top-8: 29.6 for 4 tokens against 8 for one). "
        "The gain of batching unrelated streams is bounded by the share of a step that is not routed experts: "
        "reaching 2.5x at 4 streams needs routed experts below ~35% of a one-token step's reads with 8 experts "
        "top-2, below ~20% with many small experts (or routing that the streams share).",
    ]
    return out


if __name__ == "__main__":
    sys.exit(main())
