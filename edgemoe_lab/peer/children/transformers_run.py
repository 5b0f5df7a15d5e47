"""Benchmark child: one transformers run with accelerate's disk offload.

    python transformers_run.py SPEC.json RESULT.json [PROGRESS.json]

SPEC: hf_dir, cpu_bytes (the RAM accelerate may fill; null loads everything in RAM),
offload_dir, prompt_ids, forced_ids, threads. With cpu_bytes set the model is loaded with
device_map="auto", max_memory={"cpu": cpu_bytes} and offload_folder=offload_dir: the
layers that do not fit are written to the offload folder and read back for every forward
pass. Prefill is one forward over the prompt; decode feeds the forced tokens one at a time
with the KV cache. Times are wall clock around those forwards (transformers keeps none).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import Progress, load_spec, timing_fields, write_result  # noqa: E402


def main(argv: list[str]) -> int:
    spec, result_path, progress_path = load_spec(argv)
    progress = Progress(progress_path)
    import torch

    threads = int(spec.get("threads") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    prompt = [int(t) for t in spec["prompt_ids"]]
    forced = [int(t) for t in spec["forced_ids"]]
    t0 = time.perf_counter()
    kwargs = {"dtype": torch.bfloat16}
    if spec.get("cpu_bytes") is not None:
        os.makedirs(spec["offload_dir"], exist_ok=True)
        kwargs.update(device_map="auto", max_memory={"cpu": int(spec["cpu_bytes"])},
                      offload_folder=spec["offload_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], **kwargs)
    model.eval()
    load_s = time.perf_counter() - t0
    placement = {}
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1

    progress.update(phase="prefill", load_s=load_s)
    agree = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        agree += int(out.logits[0, -1].argmax()) == forced[0]
        past = out.past_key_values
        prefill_s = time.perf_counter() - t0
        progress.update(phase="decode", prefill_s=prefill_s, tokens=1)
        t1 = time.perf_counter()
        for i, tok in enumerate(forced[:-1]):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            agree += int(out.logits[0, -1].argmax()) == forced[i + 1]
            progress.update(tokens=i + 2, decode_s=time.perf_counter() - t1)
        decode_s = time.perf_counter() - t1
    result = {
        "ok": True,
        "status": "ok",
        "load_s": round(load_s, 4),
        **timing_fields(len(prompt), len(forced), prefill_s, decode_s),
        "forced_agreement": round(agree / len(forced), 4),
        "engine_stats": {"device_map_modules": placement, "cpu_bytes": spec.get("cpu_bytes"),
                         "dtype": "bfloat16"},
        "threads": threads,
    }
    write_result(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
