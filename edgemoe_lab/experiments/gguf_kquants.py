"""K-quant experts from a GGUF (issue 18 §2): re-quantize them into an edgemoe format, as
`edgemoe convert` does, or keep llama.cpp's raw blocks and compute from them with a kernel
of their own? Measured for the two most common expert types, Q4_K (Q4_K_M's gate/up) and
Q6_K (Q4_K_M's down, Q6_K files).

The experts: Qwen3-30B-A3B's shape (hidden 2048, expert width 768), Gaussian weights
(std 0.02) with 1 % heavy-tailed input columns (std x8, the outliers real checkpoints
have), written as an F32 GGUF and quantized by llama.cpp's own llama-quantize (--pure, the
peers' environment). For each type:

- quality: the GGUF's own error (its dequantized weights vs the F32 source) and what each
  edgemoe format adds on top (vs the GGUF's dequantized weights), relative RMS;
- bytes per expert (what an offloaded cache reads on a miss);
- time of one expert forward (gate/up, SwiGLU, down) for 1, 8 and 64 tokens: the edgemoe
  formats through their C kernels, and the raw blocks dequantized per call by a torch
  port of the gguf package's dequantizer (a "raw-block kernel" in Python: what keeping the
  blocks would cost without writing SIMD code for every K-quant), plus the gguf package's
  numpy dequantizer.

    python -m edgemoe_lab.experiments.gguf_kquants [--peers edgemoe_lab/work/peer/peers] [--experts 4] [--repeats 20]

Results: edgemoe_lab/results/gguf_kquants.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgemoe_lab import paths  # noqa: E402

QK_K = 256


# ----------------------------------------------------------------------------- raw blocks in torch


def q4_k_dequant(raw: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks (n, 144) uint8 -> (n, 256) fp32 (gguf.quants.Q4_K, in torch)."""
    n = raw.shape[0]
    d = raw[:, 0:2].contiguous().view(torch.float16).float()  # (n, 1)
    dmin = raw[:, 2:4].contiguous().view(torch.float16).float()
    s = raw[:, 4:16].reshape(n, 3, 4).to(torch.int32)
    a, m, md = s[:, 0], s[:, 1], s[:, 2]  # (n, 4) each
    sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], 1).float()  # (n, 8)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1).float()
    qs = raw[:, 16:].reshape(n, 4, 1, 32).to(torch.int32)
    q = torch.cat([qs & 0x0F, qs >> 4], 2).reshape(n, 8, 32).float()  # (n, 8 sub-blocks, 32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def q6_k_dequant(raw: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks (n, 210) uint8 -> (n, 256) fp32 (gguf.quants.Q6_K, in torch)."""
    n = raw.shape[0]
    ql = raw[:, :128].reshape(n, 2, 1, 64).to(torch.int32)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32).to(torch.int32)
    scales = raw[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = raw[:, 208:210].contiguous().view(torch.float16).float()  # (n, 1)
    lo = torch.cat([ql & 0x0F, ql >> 4], 2).reshape(n, 2, 4, 32)  # (n, half, 4 x 32)
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], 2).reshape(n, 2, 4, 32)
    q = ((lo | (hi << 4)) - 32).reshape(n, 16, 16).float()
    return ((d * scales).unsqueeze(-1) * q).reshape(n, QK_K)


DEQUANT = {"Q4_K": (q4_k_dequant, 144), "Q6_K": (q6_k_dequant, 210)}


class RawExpert:
    """An expert computing from llama.cpp's blocks: each call dequantizes them (torch) and
    runs fp32 matmuls, the raw-block path without a SIMD kernel per type."""

    def __init__(self, qtype: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, hidden: int, inter: int):
        self.fn, self.block = DEQUANT[qtype]
        self.w13 = torch.from_numpy(np.concatenate([gate, up]).reshape(-1, self.block))  # (2I * H/256, bytes)
        self.w2 = torch.from_numpy(np.ascontiguousarray(down).reshape(-1, self.block))
        self.h, self.i = hidden, inter
        self.nbytes = self.w13.nbytes + self.w2.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w13 = self.fn(self.w13).reshape(2 * self.i, self.h)
        g, u = (x @ w13.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ self.fn(self.w2).reshape(self.h, self.i).T


def timed(fn, x, repeats: int) -> float:
    """Fastest of `repeats` calls of fn(x), milliseconds, after two warm-up calls: on a
    shared machine the other processes only ever add time, so the minimum is the closest
    to the uncontended cost."""
    fn(x)
    fn(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        out.append(1000 * (time.perf_counter() - t0))
    return min(out)


# ----------------------------------------------------------------------------- the files


def write_source(path: Path, experts: int, hidden: int, inter: int, seed: int = 0) -> dict:
    """An F32 GGUF of a one-layer Qwen3-MoE with these experts; returns the weights."""
    import gguf

    g = np.random.default_rng(seed)

    def weights(out: int, k: int) -> np.ndarray:
        w = g.normal(0, 0.02, (out, k)).astype(np.float32)
        cols = g.choice(k, max(1, k // 100), replace=False)
        w[:, cols] *= 8  # outlier input channels
        return w

    src = {p: np.stack([weights(*shape) for _ in range(experts)])
           for p, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}
    heads, head_dim, vocab = 16, 128, 512
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(4)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(experts)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(inter)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["t", "0"] + [f"t{i}" for i in range(vocab - 2)])
    w.add_token_merges(["t 0"])
    small = lambda *s: g.normal(0, 0.02, s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", small(vocab, hidden))
    w.add_tensor("output.weight", small(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.attn_q.weight", small(heads * head_dim, hidden))
    w.add_tensor("blk.0.attn_k.weight", small(4 * head_dim, hidden))
    w.add_tensor("blk.0.attn_v.weight", small(4 * head_dim, hidden))
    w.add_tensor("blk.0.attn_output.weight", small(hidden, heads * head_dim))
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(head_dim, np.float32))
    w.add_tensor("blk.0.attn_k_norm.weight", np.ones(head_dim, np.float32))
    w.add_tensor("blk.0.ffn_gate_inp.weight", small(experts, hidden))
    for p, a in src.items():
        w.add_tensor(f"blk.0.ffn_{p}_exps.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).sum() / (b ** 2).sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=str(paths.WORK / "peer/peers"), help="the peers' virtual environment")
    ap.add_argument("--work", default=str(paths.WORK / "gguf_kquants"))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and kernel threads (default 1: on a shared machine OpenMP barriers stall)")
    ap.add_argument("--out", default=str(paths.RESULTS / "gguf_kquants"))
    args = ap.parse_args(argv)

    import gguf

    from edgemoe_lab.peer.peers import check_llama, venv_python
    from edgemoe.quant.formats import get_format
    from edgemoe.store.gguf import GGUFCheckpoint, decode_expert

    torch.set_num_threads(args.threads)
    info = check_llama(venv_python(Path(args.peers)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    H, I = args.hidden, args.inter
    f32 = work / "experts-F32.gguf"
    src = write_source(f32, args.experts, H, I)
    rows, timing = [], []
    xs = {m: torch.randn(m, H, generator=torch.Generator().manual_seed(m)) for m in (1, 8, 64)}
    for qtype, ftype in (("Q4_K", "Q4_K_S"), ("Q6_K", "Q6_K")):
        path = work / f"experts-{qtype}.gguf"
        proc = subprocess.run([info["quantize"], "--pure", str(f32), str(path), ftype, str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"llama-quantize failed: {(proc.stderr or proc.stdout)[-2000:]}")
        ckpt = GGUFCheckpoint(path)
        sources = ckpt._expert_sources()
        got = {t.type_name for parts in sources.values() for t, _ in parts.values()}
        assert got == {qtype}, got
        own = []
        added = {f: [] for f in ("int4-asym", "int4", "int8")}
        nbytes = {f: 0 for f in added}
        experts = {}
        for e in range(args.experts):
            parts = sources[(0, e)]
            deq = {p: ckpt._read(*parts[p]) for p in ("gate", "up", "down")}
            raw = {p: ckpt._raw(*parts[p]) for p in ("gate", "up", "down")}
            own.append(rel(torch.cat([deq["gate"], deq["up"]]), np.concatenate([src["gate"][e], src["up"][e]])))
            for p in ("gate", "up", "down"):  # the torch port reads the blocks as gguf does
                fn, block = DEQUANT[qtype]
                mine = fn(torch.from_numpy(raw[p].reshape(-1, block).copy())).reshape(deq[p].shape)
                assert torch.equal(mine, deq[p].float()), (qtype, p)
            for f in added:
                fmt = get_format(f)
                enc = fmt.encode(deq["gate"], deq["up"], deq["down"])
                w13, w2 = decode_expert(fmt, enc)
                ref = torch.cat([deq["gate"].reshape(-1), deq["up"].reshape(-1), deq["down"].reshape(-1)])
                added[f].append(rel(torch.cat([w13.reshape(-1), w2.reshape(-1)]), ref))
                nbytes[f] = sum(t.numel() * t.element_size() for t in enc.values())
                if e == 0:
                    experts[f] = fmt.expert(enc, "silu", torch.float32)
            if e == 0:
                experts["raw " + qtype] = RawExpert(qtype, raw["gate"], raw["up"], raw["down"], H, I)
                raw_bytes = sum(r.nbytes for r in raw.values())

                def numpy_path(x, deq_raw=raw):
                    w = {p: torch.from_numpy(gguf.quants.dequantize(
                        deq_raw[p].reshape(gguf.quants.quant_shape_to_byte_shape(
                            (I, H) if p != "down" else (H, I), gguf.GGMLQuantizationType[qtype])),
                        gguf.GGMLQuantizationType[qtype])) for p in ("gate", "up", "down")}
                    return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T

                experts[f"raw {qtype} (gguf numpy)"] = numpy_path
        row = {"type": qtype, "own_error": statistics.mean(own), "bytes_raw": raw_bytes,
               "bits_raw": 8 * raw_bytes / (3 * H * I),
               "formats": {f: {"added_error": statistics.mean(v), "bytes": nbytes[f], "bits": 8 * nbytes[f] / (3 * H * I)}
                           for f, v in added.items()}}
        rows.append(row)
        for name, fn in experts.items():
            t = {m: timed(fn, x, args.repeats) for m, x in xs.items()}
            timing.append({"type": qtype, "path": name, "ms": t})
            print(json.dumps(timing[-1]), flush=True)
        print(json.dumps(row), flush=True)

    load = Path("/proc/loadavg").read_text().split()[:3]
    result = {"command": "python -m edgemoe_lab.experiments.gguf_kquants " + " ".join(argv if argv is not None else sys.argv[1:]),
              "shape": {"hidden": H, "expert_width": I, "experts": args.experts}, "threads": args.threads,
              "loadavg": load, "llama_quantize": f"ik-llama-cpp-python {info['version']} (--pure)",
              "quality": rows, "timing": timing}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["# K-quant experts: re-quantize or keep the raw blocks", "",
             f"`{result['command']}`; experts {H} x {I} (Qwen3-30B-A3B's shape), Gaussian with 1 % outlier columns, "
             f"quantized by {result['llama_quantize']}; {args.threads} threads, load average {' '.join(load)} "
             "(a shared 2-core machine: each time is the fastest of the repeats).", "",
             "## Quality and size", "",
             "| GGUF type | its own error | bits/weight | edgemoe format | added error (vs the GGUF's weights) | bits/weight |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for f, v in r["formats"].items():
            lines.append(f"| {r['type']} | {100 * r['own_error']:.2f}% | {r['bits_raw']:.2f} | {f} | "
                         f"{100 * v['added_error']:.2f}% | {v['bits']:.2f} |")
    lines += ["", "## One expert forward (gate/up, SwiGLU, down), milliseconds", "",
              "| GGUF type | path | 1 token | 8 tokens | 64 tokens |", "|---|---|---|---|---|"]
    for t in timing:
        lines.append(f"| {t['type']} | {t['path']} | {t['ms'][1]:.2f} | {t['ms'][8]:.2f} | {t['ms'][64]:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
