"""Benchmark child: one edgemoe run on a converted model.

    python edgemoe_run.py SPEC.json RESULT.json [PROGRESS.json]

SPEC: model (a directory from `edgemoe convert`), memory (bytes or null), runtime (load
options: mode, cache_policy, trace, ...), prompt_ids, forced_ids (the token stream to
feed; null generates greedily and reports the tokens), max_tokens, threads, record_trace.
Imports edgemoe and torch only (no transformers), so that the process stays small.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import Progress, context_size, load_spec, timing_fields, write_result  # noqa: E402


def main(argv: list[str]) -> int:
    spec, result_path, progress_path = load_spec(argv)
    progress = Progress(progress_path)
    import torch

    torch.set_num_threads(int(spec.get("threads") or os.cpu_count() or 1))
    from edgemoe.api import load
    from edgemoe.generate import stream_generate
    from edgemoe.errors import EdgeMoEError

    forced = spec.get("forced_ids")
    n = len(forced) if forced is not None else int(spec["max_tokens"])
    runtime = {"ctx_size": _ctx_size(spec["model"], len(spec["prompt_ids"]) + n), **(spec.get("runtime") or {})}
    t0 = time.perf_counter()
    try:
        engine = load(spec["model"], memory=spec.get("memory"), **runtime)
    except EdgeMoEError as e:  # e.g. a budget below what the model needs: a result, not a crash
        write_result(result_path, {"ok": False, "status": "refused", "error": str(e)})
        return 0
    load_s = time.perf_counter() - t0
    recorder = None
    if spec.get("record_trace"):
        from edgemoe.runtime.trace import TraceRecorder

        recorder = TraceRecorder(engine.model)

    prompt = list(spec["prompt_ids"])
    agree = [0, 0]  # greedy choice == forced token, tokens compared
    greedy: list[int] = []  # the engine's own greedy choice at each position

    def sampler(scores):  # (V,)
        i = agree[1]
        best = int(scores.argmax())
        greedy.append(best)
        agree[1] += 1
        if forced is None:
            return best
        agree[0] += int(best == forced[i])
        return int(forced[i])

    progress.update(phase="prefill", load_s=load_s)
    ids, last = [], None
    t_first = None
    with engine:
        if engine.provider is not None:
            engine.provider.reset_stats()
        for r in stream_generate(engine.model, engine.tokenizer, prompt, n, sampler, (), (), True, None):
            if r.token is not None:
                ids.append(r.token)
                if t_first is None:
                    t_first = time.perf_counter()
                    progress.update(phase="decode", prefill_s=r.stats.prefill_s, tokens=1)
                else:
                    progress.update(tokens=len(ids), decode_s=time.perf_counter() - t_first)
            last = r
        if recorder is not None:
            recorder.save(spec["record_trace"])
        stats = last.stats
        extra = dict(stats.extra)
    result = {
        "ok": True,
        "status": "ok",
        "load_s": round(load_s, 4),
        **timing_fields(stats.prompt_tokens, stats.generated_tokens, stats.prefill_s, stats.decode_s),
        "token_ids": ids,
        "forced_agreement": round(agree[0] / agree[1], 4) if forced is not None and agree[1] else None,
        "greedy_ids": greedy,
        "engine_stats": extra,
        "load_info": {k: v for k, v in engine.info.items() if not isinstance(v, (dict, list))},
        "threads": torch.get_num_threads(),
    }
    write_result(result_path, result)
    return 0


def _ctx_size(model: str, tokens: int) -> int:
    """llama.cpp's context for the run (context_size), capped at the model's positions."""
    from edgemoe.store.manifest import read_manifest
    from edgemoe.store.reader import check_manifest

    return min(context_size(tokens, 0), check_manifest(read_manifest(model)).max_position_embeddings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
