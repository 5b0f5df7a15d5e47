"""GGUF in (issue 18, section 5): edgemoe and llama.cpp on the same llama.cpp-made GGUF.

For each model: llama.cpp's own converter (convert_hf_to_gguf.py of the peers'
environment, run through edgemoe/bench/children/gguf_convert.py) writes an F32 GGUF and a
Q8_0 one, llama-quantize makes a Q4_K one (--pure) from the F32. Then, on the same held-out token
ids (teacher forcing, every position):

- llama.cpp (ik-llama-cpp-python's C API, CPU) computes next-token logits from the GGUF;
- edgemoe converts the GGUF (`edgemoe convert`, default plan: Q8_0 -> int8, Q4_K -> int4-asym,
  Q6_K -> int8) and computes logits in fp32 with every expert in RAM;
- transformers computes logits from the source checkpoint (fp32).

Reported: top-1 agreement and mean KL(llama.cpp || edgemoe) of the next-token
distributions, and the same for llama.cpp vs transformers as the yardstick of how far
llama.cpp itself is from the reference. Models: the bundled trained Mixtral (the only one
whose distributions are peaked, so top-1 means something), and random-weight Qwen2-MoE and
Qwen3-MoE with 256-wide rows (so Q4_K applies everywhere). OLMoE is not in the list: the
converter of the peers' llama.cpp (ik_llama.cpp) has no OlmoeForCausalLM.

    python bench/gguf_agreement.py [--peers bench/work/peer/peers] [--tokens 256]

Set the peers' environment up first (`bench/setup_peers.sh`). Results:
bench/results/gguf_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import ctypes, sys, numpy as np
from ik_llama_cpp import _ctypes_api as C
gguf, ids_file, out = sys.argv[1:4]
ids = [int(t) for t in np.load(ids_file)]
C.llama_backend_init()
mp = C.llama_model_default_params(); mp.n_gpu_layers = 0
if hasattr(mp, "repack_tensors"): mp.repack_tensors = False
model = C.llama_model_load_from_file(gguf.encode(), mp)
assert model, "llama.cpp could not load " + gguf
n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
cp = C.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = (len(ids) + 255) // 256 * 256
cp.n_seq_max = 1; cp.n_threads = cp.n_threads_batch = 2; cp.flash_attn = False
ctx = C.llama_init_from_model(model, cp)
batch = C.llama_batch_init(len(ids), 0, 1)
batch.n_tokens = len(ids)
for i, t in enumerate(ids):
    batch.token[i] = t; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1
assert C.llama_decode(ctx, batch) == 0
rows = [np.ctypeslib.as_array(ctypes.cast(C.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float)),
                              shape=(n_vocab,)).copy() for i in range(len(ids))]
np.save(out, np.stack(rows))
"""


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return proc


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """Top-1 agreement and mean KL(p || q) over positions."""
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1": float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean()), "kl": float(kl.mean()),
            "kl_max": float(kl.max())}


def make_models(work: Path) -> dict[str, Path]:
    """The source checkpoints (Hugging Face directories, configs in the spelling the
    peers' converter reads)."""
    import torch
    import transformers as tf

    models = {}
    bundled = work / "bundled-mixtral"
    if not bundled.exists():
        shutil.copytree(ROOT / "edgemoe/assets/tiny-moe", bundled)
    models["bundled mixtral (trained)"] = bundled
    tok = ROOT / "edgemoe/assets/tiny-moe"
    base = dict(vocab_size=json.loads((tok / "config.json").read_text())["vocab_size"], hidden_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, initializer_range=0.02)
    for name, cls, extra in (
        ("mixtral", tf.MixtralConfig, dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                                          head_dim=64)),
        ("qwen2_moe", tf.Qwen2MoeConfig, dict(intermediate_size=512, moe_intermediate_size=256,
                                             shared_expert_intermediate_size=512, num_experts=8, num_experts_per_tok=2)),
        ("qwen3_moe", tf.Qwen3MoeConfig, dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                             num_experts_per_tok=2, norm_topk_prob=True, head_dim=64)),
    ):
        d = work / name
        if not d.exists():
            torch.manual_seed(0)
            tf.AutoModelForCausalLM.from_config(cls(**base, **extra)).eval().save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(tok / f, d / f)
            cfg = json.loads((d / "config.json").read_text())
            cfg.setdefault("num_experts", cfg.get("num_local_experts"))  # the converter's spelling
            cfg = {k: v for k, v in cfg.items() if v is not None}  # it cannot write nulls (sliding_window)
            (d / "config.json").write_text(json.dumps(cfg))
        models[f"{name} (random)"] = d
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=str(ROOT / "bench/work/peer/peers"), help="the peers' virtual environment")
    ap.add_argument("--work", default=str(ROOT / "bench/work/gguf_agreement"))
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens per model")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gguf_agreement"))
    args = ap.parse_args(argv)

    import torch
    import transformers as tf

    import edgemoe
    from edgemoe.bench.peers import check_llama, venv_python
    from edgemoe.errors import ModelLoadError
    from edgemoe.store.convert import convert
    from edgemoe.tokenizer import Tokenizer

    torch.set_num_threads(2)
    py = venv_python(Path(args.peers))
    info = check_llama(py)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    child = work / "llama_logits.py"
    child.write_text(CHILD)
    text = (ROOT / "edgemoe/assets/heldout.txt").read_text()
    rows = []
    for label, hf_dir in make_models(work).items():
        n = min(args.tokens, json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"])
        ids = np.array(Tokenizer(hf_dir).encode(text, add_special_tokens=False)[:n], dtype=np.int64)
        np.save(work / "ids.npy", ids)
        hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
        stem = work / hf_dir.name
        f32 = Path(f"{stem}-F32.gguf")
        run([py, ROOT / "edgemoe/bench/children/gguf_convert.py", info["converter"], hf_dir, f32, "f32"])
        ggufs = {"F32": f32, "Q8_0": Path(f"{stem}-Q8_0.gguf"), "Q4_K": Path(f"{stem}-Q4_K.gguf")}
        run([py, ROOT / "edgemoe/bench/children/gguf_convert.py", info["converter"], hf_dir, ggufs["Q8_0"], "q8_0"])
        # --pure: every tensor Q4_K; the mixtures (Q4_K_M) of this llama.cpp fork use its own types
        # for some tensors, which the gguf package (and so edgemoe) cannot read.
        run([info["quantize"], "--pure", f32, ggufs["Q4_K"], "Q4_K_S"])
        for qtype, gguf_file in ggufs.items():
            run([py, child, gguf_file, work / "ids.npy", work / "llama.npy"])
            llama = np.load(work / "llama.npy")
            out = Path(f"{stem}-{qtype}-edgemoe")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            try:
                r = convert(gguf_file, out, dtype="float32")
            except ModelLoadError as e:
                rows.append({"model": label, "gguf": qtype, "refused": str(e)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            seconds = time.perf_counter() - t0
            engine = edgemoe.load(out, mode="io-free")
            try:
                with torch.no_grad():
                    ours = engine.model(torch.from_numpy(ids)[None])[0].float().numpy()
            finally:
                engine.close()
            row = {"model": label, "gguf": qtype, "tokens": int(len(ids)), "edgemoe_formats": r.formats,
                   "added_error": r.added_error, "convert_s": round(seconds, 2),
                   "edgemoe_vs_llama": compare(llama, ours), "transformers_vs_llama": compare(llama, ref),
                   "edgemoe_vs_transformers": compare(ref, ours)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"command": "python bench/gguf_agreement.py " + " ".join(argv or sys.argv[1:]),
              "llama_cpp": {"package": f"ik-llama-cpp-python {info['version']}", "converter": "convert_hf_to_gguf.py",
                            "quantize": "llama-quantize"}, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["# edgemoe vs llama.cpp on the same llama.cpp-made GGUF", "",
             f"`{result['command']}`; llama.cpp: {result['llama_cpp']['package']} (converter and quantizer of the "
             "peers' environment). Held-out text: edgemoe/assets/heldout.txt, teacher-forced, every position; "
             "edgemoe computes in fp32 with all experts in RAM, after `edgemoe convert FILE.gguf` (default plan).", "",
             "| model | GGUF | edgemoe experts | top-1 edgemoe = llama.cpp | KL(llama.cpp ‖ edgemoe) mean / max "
             "| top-1 transformers = llama.cpp | KL(llama.cpp ‖ transformers) | added weight error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['gguf']} | refused: {r['refused']} | | | | | |")
            continue
        e, t = r["edgemoe_vs_llama"], r["transformers_vs_llama"]
        fmts = ", ".join(f"{k} x{v}" for k, v in sorted(r["edgemoe_formats"].items()))
        added = "; ".join(f"{k}: {100 * v['rel_rms']:.2f}%" for k, v in sorted(r["added_error"].items()))
        lines.append(f"| {r['model']} | {r['gguf']} | {fmts} | {100 * e['top1']:.1f}% | {e['kl']:.2e} / {e['kl_max']:.2e} "
                     f"| {100 * t['top1']:.1f}% | {t['kl']:.2e} | {added} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
