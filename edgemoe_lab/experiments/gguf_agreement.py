"""GGUF in (issue 18, section 5): edgemoe and llama.cpp on the same llama.cpp-made GGUF.

For each model: llama.cpp's own converter (convert_hf_to_gguf.py of the peers'
environment, run through edgemoe_lab/peer/children/gguf_convert.py) writes an F32 GGUF and a
Q8_0 one, llama-quantize makes a Q4_K one (--pure) from the F32. Then, on the same held-out token
ids (teacher forcing, every position):

- llama.cpp (ik-llama-cpp-python's C API, CPU) computes next-token logits from the GGUF;
- edgemoe converts the GGUF (`edgemoe convert`, default plan: Q8_0 -> int8, Q4_K -> int4-asym,
  Q6_K -> int8) and computes logits in fp32 with every expert in RAM;
- transformers computes logits from the source checkpoint (fp32).

Reported: top-1 agreement and mean KL(llama.cpp || edgemoe) of the next-token
distributions, and the same for llama.cpp vs transformers as the yardstick of how far
llama.cpp itself is from the reference. Models: the bundled trained Mixtral (the only one
whose distributions are peaked, so top-1 means something), the same model written exactly
as an ERNIE-4.5-MoE checkpoint (see `as_ernie`: the peers' ik_llama.cpp computes its `llama`
architecture's MoE layers wrongly, so with it the trained model is compared through the
ERNIE graph), and random-weight Qwen2-MoE, Qwen3-MoE, dots1, GLM-4.5, DeepSeek-V3,
DeepSeek-V2 and DBRX with 256-wide rows (so Q4_K applies everywhere). OLMoE, Llama 4 and
gpt-oss are not in the list: the converter of the peers' llama.cpp (ik_llama.cpp) has no
OlmoeForCausalLM, Llama4ForCausalLM or GptOssForCausalLM.
That converter reads the original checkpoints' config spelling (DeepSeek's scoring_func,
rope_scaling, GLM's special tokens by name) and writes no expert groups, so the configs
here are written in it and route in one group.

    python -m edgemoe_lab.experiments.gguf_agreement [--peers edgemoe_lab/work/peer/peers] [--tokens 256] [--models qwen3_moe,dots1]

`--llama-python PY` takes llama.cpp's logits from plain llama.cpp (a Python with llama-cpp-python,
which PyPI ships as source to build) instead of the peers' ik_llama.cpp; the GGUFs stay the same.

Set the peers' environment up first (`edgemoe_lab/peer/setup_peers.sh`). Results:
edgemoe_lab/results/gguf_agreement.{json,md}.
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

from edgemoe_lab import paths  # noqa: E402

ROOT = paths.ROOT
CHILD = r"""
import ctypes, importlib, sys, numpy as np
gguf, ids_file, out, api = sys.argv[1:5]
C = importlib.import_module(api)  # ik_llama_cpp._ctypes_api or llama_cpp.llama_cpp: the same C API
ids = [int(t) for t in np.load(ids_file)]
C.llama_backend_init()
mp = C.llama_model_default_params(); mp.n_gpu_layers = 0
if hasattr(mp, "repack_tensors"): mp.repack_tensors = False
model = C.llama_model_load_from_file(gguf.encode(), mp)
assert model, "llama.cpp could not load " + gguf
n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
cp = C.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = (len(ids) + 255) // 256 * 256
cp.n_seq_max = 1; cp.n_threads = cp.n_threads_batch = 2
if hasattr(cp, "flash_attn_type"): cp.flash_attn_type = 0  # newer llama.cpp: an enum, 0 = disabled
else: cp.flash_attn = False
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


def as_ernie(src: Path, dst: Path) -> None:
    """Write the Mixtral checkpoint `src` as the ERNIE-4.5-MoE checkpoint `dst` that computes
    the same function: every layer MoE (no shared experts, a zero correction bias), the same
    softmax top-k routing renormalised, and q/k rows permuted from rotate-half RoPE to
    ERNIE's interleaved pairs (llama.cpp's LlamaModel.permute). transformers' logits of
    the two agree to ~1e-5 (fp32 summation order); the benchmark compares each engine with
    transformers on the ERNIE checkpoint itself."""
    import torch
    import transformers as tf

    mx = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    c = mx.config
    cfg = tf.Ernie4_5_MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        intermediate_size=c.intermediate_size, moe_intermediate_size=c.intermediate_size,
        moe_num_experts=c.num_local_experts, moe_k=c.num_experts_per_tok, moe_num_shared_experts=0,
        moe_layer_start_index=0, moe_layer_end_index=c.num_hidden_layers - 1, moe_layer_interval=1, use_bias=False)
    ernie = tf.AutoModelForCausalLM.from_config(cfg).eval()
    theirs = mx.state_dict()
    weights = {}
    for name, t in ernie.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            weights[name] = torch.zeros_like(t)
            continue
        w = theirs[name]  # the two families name every other tensor alike
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)
        weights[name] = w
    ernie.load_state_dict(weights, strict=True)
    ernie.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)


def make_models(work: Path, wanted: set[str] | None = None) -> dict[str, Path]:
    """The source checkpoints (Hugging Face directories, configs in the spelling the
    peers' converter reads)."""
    import torch
    import transformers as tf

    from tokenizers import AddedToken, Tokenizer

    models = {}
    bundled = work / "bundled-mixtral"
    if not bundled.exists():
        shutil.copytree(ROOT / "edgemoe/assets/tiny-moe", bundled)
    if wanted is None or "bundled" in wanted:
        models["bundled mixtral (trained)"] = bundled
    if wanted is None or "bundled_ernie" in wanted:
        ernie = work / "bundled-ernie"
        if not ernie.exists():
            as_ernie(bundled, ernie)
        models["bundled mixtral (trained) as ERNIE-4.5-MoE"] = ernie
    tok = ROOT / "edgemoe/assets/tiny-moe"
    base = dict(vocab_size=json.loads((tok / "config.json").read_text())["vocab_size"], hidden_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, initializer_range=0.02)
    glm_tokens = ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")  # looked up by name by the converter
    v3 = dict(intermediate_size=512, moe_intermediate_size=256, num_key_value_heads=4, n_routed_experts=8,
              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
              kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)
    for name, cls, extra in (
        ("mixtral", tf.MixtralConfig, dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                                          head_dim=64)),
        ("qwen2_moe", tf.Qwen2MoeConfig, dict(intermediate_size=512, moe_intermediate_size=256,
                                             shared_expert_intermediate_size=512, num_experts=8, num_experts_per_tok=2)),
        ("qwen3_moe", tf.Qwen3MoeConfig, dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                             num_experts_per_tok=2, norm_topk_prob=True, head_dim=64)),
        ("dots1", tf.Dots1Config, dict(num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8,
                                       num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                       norm_topk_prob=True, routed_scaling_factor=2.0, head_dim=64,
                                       sliding_window=None)),
        ("glm4_moe", tf.Glm4MoeConfig, dict(num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8,
                                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                           n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                           use_qk_norm=True, attention_bias=True, head_dim=64,
                                           vocab_size=base["vocab_size"] + len(glm_tokens))),
        ("deepseek_v3", tf.DeepseekV3Config, dict(v3, q_lora_rank=128, routed_scaling_factor=2.5,
                                                 norm_topk_prob=True)),
        ("deepseek_v2", tf.DeepseekV2Config, dict(v3, q_lora_rank=None, n_shared_experts=2,
                                                 routed_scaling_factor=1.0, norm_topk_prob=False,
                                                 topk_method="greedy")),
        ("dbrx", tf.DbrxConfig, dict(d_model=256, n_heads=4, n_layers=4, max_seq_len=512,
                                     attn_config={"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 10000.0},
                                     ffn_config={"ffn_hidden_size": 256, "moe_num_experts": 8, "moe_top_k": 2},
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    ):
        if wanted is not None and name not in wanted:
            continue
        d = work / name
        if not d.exists():
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(cls(**{**base, **extra})).eval()
            with torch.no_grad():  # a correction bias that matters (around -1)
                for n, b in model.named_buffers():
                    if n.endswith("e_score_correction_bias"):
                        b.copy_(-1.0 + 0.3 * torch.randn(b.shape))
            model.save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(tok / f, d / f)
            if name == "glm4_moe":
                t = Tokenizer.from_file(str(d / "tokenizer.json"))
                t.add_special_tokens([AddedToken(x, special=True) for x in glm_tokens])
                t.save(str(d / "tokenizer.json"))
            cfg = json.loads((d / "config.json").read_text())
            cfg.setdefault("num_experts", cfg.get("num_local_experts") or cfg.get("n_routed_experts"))
            if name.startswith(("deepseek", "dots1")):
                cfg.setdefault("scoring_func", "softmax" if name == "deepseek_v2" else "sigmoid")
            keep = {"q_lora_rank"}  # null means something here
            cfg = {k: v for k, v in cfg.items() if v is not None or k in keep}  # it cannot write other nulls
            (d / "config.json").write_text(json.dumps(cfg))
        models[f"{name} (random)"] = d
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=str(paths.WORK / "peer/peers"), help="the peers' virtual environment")
    ap.add_argument("--work", default=str(paths.WORK / "gguf_agreement"))
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens per model")
    ap.add_argument("--out", default=str(paths.RESULTS / "gguf_agreement"))
    ap.add_argument("--models", default=None,
                    help="comma-separated subset (bundled, bundled_ernie, mixtral, qwen2_moe, qwen3_moe, dots1, "
                         "glm4_moe, deepseek_v3, deepseek_v2, dbrx); the other models' rows are kept from the "
                         "existing results")
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python (plain llama.cpp) to compute llama.cpp's logits instead of "
                         "the peers' ik_llama.cpp; the GGUFs are still made by the peers' converter and quantizer, "
                         "and the rows are labelled with that llama.cpp")
    args = ap.parse_args(argv)
    wanted = set(args.models.split(",")) if args.models else None

    import torch
    import transformers as tf

    import edgemoe
    from edgemoe_lab.peer.peers import check_llama, venv_python
    from edgemoe.errors import ModelLoadError
    from edgemoe.store.convert import convert
    from edgemoe.tokenizer import Tokenizer

    torch.set_num_threads(2)
    py = venv_python(Path(args.peers))
    info = check_llama(py)
    llama_py, api, tag = py, "ik_llama_cpp._ctypes_api", ""
    if args.llama_python:
        llama_py, api = Path(args.llama_python), "llama_cpp.llama_cpp"
        version = run([llama_py, "-c", "import llama_cpp; print(llama_cpp.__version__)"]).stdout.strip()
        tag = f" [llama-cpp-python {version}]"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    child = work / "llama_logits.py"
    child.write_text(CHILD)
    text = (ROOT / "edgemoe/assets/heldout.txt").read_text()
    rows = []
    models = {label + tag: d for label, d in make_models(work, wanted).items()}
    kept, earlier = [], None
    if wanted is not None and Path(args.out + ".json").exists():
        before = json.loads(Path(args.out + ".json").read_text())
        kept = [r for r in before["rows"] if r["model"] not in models]
        earlier = before.get("earlier") or before["command"]
    for label, hf_dir in models.items():
        cfg = json.loads((hf_dir / "config.json").read_text())
        n = min(args.tokens, cfg.get("max_position_embeddings", cfg.get("max_seq_len", args.tokens)))
        ids = np.array(Tokenizer(hf_dir).encode(text, add_special_tokens=False)[:n], dtype=np.int64)
        np.save(work / "ids.npy", ids)
        hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
        stem = work / hf_dir.name
        f32 = Path(f"{stem}-F32.gguf")
        run([py, ROOT / "edgemoe_lab/peer/children/gguf_convert.py", info["converter"], hf_dir, f32, "f32"])
        ggufs = {"F32": f32, "Q8_0": Path(f"{stem}-Q8_0.gguf"), "Q4_K": Path(f"{stem}-Q4_K.gguf")}
        run([py, ROOT / "edgemoe_lab/peer/children/gguf_convert.py", info["converter"], hf_dir, ggufs["Q8_0"], "q8_0"])
        # --pure: every tensor Q4_K; the mixtures (Q4_K_M) of this llama.cpp fork use its own types
        # for some tensors, which the gguf package (and so edgemoe) cannot read.
        proc = subprocess.run([str(c) for c in (info["quantize"], "--pure", f32, ggufs["Q4_K"], "Q4_K_S")],
                              capture_output=True, text=True)
        if proc.returncode:  # this llama-quantize cannot quantize every file its converter writes
            asserts = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "GGML_ASSERT" in ln or "error" in ln]
            rows.append({"model": label, "gguf": "Q4_K", "refused": "not made: llama-quantize failed: "
                         + (asserts[0].split(": ", 1)[-1] if asserts else f"exit {proc.returncode}")[:160]})
            del ggufs["Q4_K"]
        for qtype, gguf_file in ggufs.items():
            proc = subprocess.run([str(c) for c in (llama_py, child, gguf_file, work / "ids.npy", work / "llama.npy",
                                                    api)], capture_output=True, text=True)
            llama_error = None
            if proc.returncode:  # this llama.cpp cannot run every file its converter writes
                lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
                llama_error = (lines[0] if lines else proc.stderr.strip().splitlines()[-1])[:200]
            llama = None if llama_error else np.load(work / "llama.npy")
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
                   "edgemoe_vs_llama": compare(llama, ours) if llama is not None else None,
                   "transformers_vs_llama": compare(llama, ref) if llama is not None else None,
                   "llama_error": llama_error, "edgemoe_vs_transformers": compare(ref, ours)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    order = {m: i for i, m in enumerate(dict.fromkeys([r["model"] for r in kept + rows]))}
    rows = sorted(kept + rows, key=lambda r: order[r["model"]])
    result = {"command": "python -m edgemoe_lab.experiments.gguf_agreement " + " ".join(argv or sys.argv[1:]), "earlier": earlier,
              "llama_cpp": {"package": f"ik-llama-cpp-python {info['version']}", "converter": "convert_hf_to_gguf.py",
                            "quantize": "llama-quantize"}, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["# edgemoe vs llama.cpp on the same llama.cpp-made GGUF", "",
             f"`{result['command']}`; llama.cpp: {result['llama_cpp']['package']} (converter and quantizer of the "
             "peers' environment; rows marked [llama-cpp-python X] have llama.cpp's logits from that build of plain "
             "llama.cpp, on the same files). Held-out text: edgemoe/assets/heldout.txt, teacher-forced, every position; "
             "edgemoe computes in fp32 with all experts in RAM, after `edgemoe convert FILE.gguf` (default plan)."
             + (f" Rows of the models not in --models come from an earlier run: `{earlier}`." if kept else ""), "",
             "| model | GGUF | edgemoe experts | top-1 edgemoe = llama.cpp | KL(llama.cpp ‖ edgemoe) mean / max "
             "| top-1 transformers = llama.cpp | KL(llama.cpp ‖ transformers) | top-1 edgemoe = transformers "
             "| KL(transformers ‖ edgemoe) | added weight error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['gguf']} | refused: {r['refused']} | | | | | | | |")
            continue
        e, t, x = r["edgemoe_vs_llama"], r["transformers_vs_llama"], r.get("edgemoe_vs_transformers")
        fmts = ", ".join(f"{k} x{v}" for k, v in sorted(r["edgemoe_formats"].items()))
        added = "; ".join(f"{k}: {100 * v['rel_rms']:.2f}%" for k, v in sorted(r["added_error"].items()))
        if e is None:
            llama_cells = f"llama.cpp could not load it: {r['llama_error']} | | |"
        else:
            llama_cells = f"{100 * e['top1']:.1f}% | {e['kl']:.2e} / {e['kl_max']:.2e} | {100 * t['top1']:.1f}% | {t['kl']:.2e}"
        ours = f"{100 * x['top1']:.1f}% | {x['kl']:.2e}" if x else " | "
        lines.append(f"| {r['model']} | {r['gguf']} | {fmts} | {llama_cells} | {ours} | {added} |")
    md = Path(args.out + ".md")
    # The written reading of the results (from "## Reading" on) is kept across reruns.
    reading = md.read_text().partition("\n## Reading")[2] if md.exists() else ""
    md.write_text("\n".join(lines) + "\n" + ("\n## Reading" + reading if reading else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
