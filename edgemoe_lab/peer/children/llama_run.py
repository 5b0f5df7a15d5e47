"""Benchmark child: one llama.cpp run on a GGUF file, through the C API of the
ik-llama-cpp-python bindings (ctypes; nothing of llama.cpp is part of edgemoe).

    python llama_run.py SPEC.json RESULT.json [PROGRESS.json]

SPEC: gguf, prompt_ids, forced_ids, threads, repack (default false), mmap (default true).
The prompt is decoded as one batch, then the forced tokens one at a time, exactly the
token stream every other engine gets. Weights stay memory-mapped (llama.cpp's default), so
under a memory cgroup they compete with everything else for the limit. Weight repacking
is off: it copies the weights into anonymous memory (no longer mapped) and it crashes on
AMX CPUs with quantized models. Timings are llama.cpp's own (llama_get_timings); wall
clock times of the same steps are reported next to them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import Progress, context_size, load_spec, timing_fields, write_result  # noqa: E402


def main(argv: list[str]) -> int:
    spec, result_path, progress_path = load_spec(argv)
    progress = Progress(progress_path)
    import numpy as np
    from ik_llama_cpp import _ctypes_api as C  # the bindings' ctypes declarations

    threads = int(spec.get("threads") or os.cpu_count() or 1)
    prompt = [int(t) for t in spec["prompt_ids"]]
    forced = [int(t) for t in spec["forced_ids"]]

    t0 = time.perf_counter()
    C.llama_backend_init()
    mp = C.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_mmap = bool(spec.get("mmap", True))
    mp.use_mlock = False
    if hasattr(mp, "repack_tensors"):
        mp.repack_tensors = bool(spec.get("repack", False))
    model = C.llama_model_load_from_file(spec["gguf"].encode(), mp)
    if not model:
        write_result(result_path, {"ok": False, "status": "error", "error": f"llama.cpp could not load {spec['gguf']}"})
        return 0
    n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
    cp = C.llama_context_default_params()
    n_ctx = context_size(len(prompt), len(forced))
    cp.n_ctx = n_ctx
    cp.n_batch = n_ctx
    cp.n_seq_max = 1
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.flash_attn = False  # ik_llama.cpp's flash attention asserts on CPUs without AVX-VNNI
    ctx = C.llama_init_from_model(model, cp)
    if not ctx:
        write_result(result_path, {"ok": False, "status": "error", "error": "llama.cpp could not create a context"})
        return 0
    load_s = time.perf_counter() - t0

    def decode(tokens: list[int], pos: int) -> None:
        batch = C.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == len(tokens) - 1 else 0
            ret = C.llama_decode(ctx, batch)
        finally:
            C.llama_batch_free(batch)
        if ret != 0:
            raise RuntimeError(f"llama_decode returned {ret}")

    def argmax() -> int:
        ptr = C.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).argmax())

    C.llama_reset_timings(ctx)
    progress.update(phase="prefill", load_s=load_s)
    agree = 0
    t0 = time.perf_counter()
    decode(prompt, 0)
    agree += argmax() == forced[0]
    prefill_wall = time.perf_counter() - t0
    progress.update(phase="decode", prefill_s=prefill_wall, tokens=1)
    t1 = time.perf_counter()
    for i, tok in enumerate(forced[:-1]):
        decode([tok], len(prompt) + i)
        agree += argmax() == forced[i + 1]
        progress.update(tokens=i + 2, decode_s=time.perf_counter() - t1)
    decode_wall = time.perf_counter() - t1
    tm = C.llama_get_timings(ctx)
    own = {"t_load_ms": tm.t_load_ms, "t_p_eval_ms": tm.t_p_eval_ms, "t_eval_ms": tm.t_eval_ms,
           "n_p_eval": tm.n_p_eval, "n_eval": tm.n_eval}
    prefill_s = tm.t_p_eval_ms / 1e3 if tm.n_p_eval == len(prompt) and tm.t_p_eval_ms > 0 else prefill_wall
    decode_s = tm.t_eval_ms / 1e3 if tm.n_eval == len(forced) - 1 and tm.t_eval_ms > 0 else decode_wall
    buf = ctypes.create_string_buffer(256)
    C.llama_model_desc(model, buf, 256)
    result = {
        "ok": True,
        "status": "ok",
        "load_s": round(load_s, 4),
        **timing_fields(len(prompt), len(forced), prefill_s, decode_s),
        "wall": {"prefill_s": round(prefill_wall, 6), "decode_s": round(decode_wall, 6)},
        "timing_source": "llama_get_timings" if decode_s != decode_wall else "wall clock",
        "forced_agreement": round(agree / len(forced), 4),
        "engine_stats": {"llama_timings": own, "model_desc": buf.value.decode(errors="replace"),
                         "mmap": bool(mp.use_mmap), "repack": bool(getattr(mp, "repack_tensors", False)),
                         "n_ctx": n_ctx},
        "threads": threads,
    }
    write_result(result_path, result)
    C.llama_free(ctx)
    C.llama_free_model(model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
