"""lm-evaluation-harness against the edgemoe server, offline, with a transformers baseline.

Runs lm-eval's `local-completions` model (the OpenAI completions client lm-eval ships)
against `edgemoe serve`-equivalent server on the bundled model, on two local tasks
(edgemoe_lab/experiments/lm_eval_tasks/tasks, data in edgemoe_lab/experiments/lm_eval_tasks/data):
- edgemoe_code_mc: loglikelihood multiple choice (echo + logprobs + max_tokens 1 requests
  with token-id prompts, as MMLU/ARC/HellaSwag send them);
- edgemoe_code_gen: generate_until (greedy, stop at a newline).
The same tasks then run on lm-eval's `hf` model (transformers) on the same weights; the
per-sample log-likelihoods and the metrics are compared.

lm-eval is heavy (datasets, evaluate, sacrebleu, ...), so it is not a test dependency:
    python -m venv /tmp/lmvenv && /tmp/lmvenv/bin/pip install torch==2.13.0
    /tmp/lmvenv/bin/pip install "lm-eval[api,hf]==0.4.13" transformers==5.24.0
    .venv/bin/python -m edgemoe_lab.experiments.lm_eval_local --lm-eval /tmp/lmvenv/bin/lm-eval
Results: edgemoe_lab/results/lm_eval.md and .json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgemoe_lab import paths  # noqa: E402

ROOT = paths.ROOT
TASKS = "edgemoe_code_mc,edgemoe_code_gen"


def run_lm_eval(exe: str, model: str, model_args: str, out: Path) -> tuple[list[str], dict, dict, float]:
    cmd = [exe, "run", "--model", model, "--model_args", model_args, "--tasks", TASKS, "--device", "cpu",
           "--include_path", "edgemoe_lab/experiments/lm_eval_tasks/tasks", "--output_path", str(out), "--log_samples", "--seed", "1234"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(out / "hf-datasets-cache"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"lm-eval failed ({proc.returncode}): {shlex.join(cmd)}")
    results = json.loads(Path(sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))[-1]).read_text())
    samples = {}
    for f in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(f).name.split("samples_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
    return cmd, results, samples, wall


def loglikelihoods(samples: list[dict]) -> list[float]:
    """Every (context, choice) log-likelihood of a multiple-choice task's samples, in order."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        for resp in s["resps"]:
            out.append(float(resp[0][0]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-eval", default="lm-eval", help="the lm-eval executable (in its own environment)")
    p.add_argument("--dtype", default="float32", help="weights dtype for both runs (default float32)")
    p.add_argument("--out", default=str(paths.RESULTS / "lm_eval"))
    args = p.parse_args(argv)

    import edgemoe
    from edgemoe.server import make_server

    engine = edgemoe.load(dtype=args.dtype)
    server = make_server(engine, port=0, model_name="tiny", timeout=120)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    model_dir = str(engine.path)
    work = Path(tempfile.mkdtemp(prefix="lm-eval-"))
    # max_length: the bundled model's 256 positions (lm-eval truncates contexts to it).
    api_args = (f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={model_dir},"
                "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                "max_length=256,timeout=120")
    cmd_api, res_api, samples_api, wall_api = run_lm_eval(args.lm_eval, "local-completions", api_args, work / "api")
    server.shutdown()
    server.server_close()
    hf_args = f"pretrained={model_dir},dtype={args.dtype},max_length=256"
    cmd_hf, res_hf, samples_hf, wall_hf = run_lm_eval(args.lm_eval, "hf", hf_args, work / "hf")

    rows = []
    for task, metrics in (("edgemoe_code_mc", ("acc,none", "acc_norm,none")), ("edgemoe_code_gen", ("exact_match,none",))):
        for m in metrics:
            rows.append({"task": task, "metric": m.split(",")[0], "edgemoe_server": res_api["results"][task][m],
                         "transformers": res_hf["results"][task][m], "n": res_api["n-samples"][task]["effective"]})
    ll_api, ll_hf = loglikelihoods(samples_api["edgemoe_code_mc"]), loglikelihoods(samples_hf["edgemoe_code_mc"])
    max_diff = max(abs(a - b) for a, b in zip(ll_api, ll_hf))
    gen_api = [s["filtered_resps"][0] for s in sorted(samples_api["edgemoe_code_gen"], key=lambda s: s["doc_id"])]
    gen_hf = [s["filtered_resps"][0] for s in sorted(samples_hf["edgemoe_code_gen"], key=lambda s: s["doc_id"])]
    same_gen = sum(a == b for a, b in zip(gen_api, gen_hf))
    import importlib.metadata as md

    versions = subprocess.run([args.lm_eval.replace("lm-eval", "python").replace("lm_eval", "python"), "-c",
                               "import lm_eval, transformers; print(lm_eval.__version__, transformers.__version__)"],
                              capture_output=True, text=True).stdout.split()
    result = {"rows": rows, "loglikelihoods": len(ll_api), "max_abs_loglikelihood_diff": max_diff,
              "generations_identical": f"{same_gen}/{len(gen_api)}", "generations_edgemoe": gen_api,
              "generations_transformers": gen_hf, "wall_s": {"edgemoe_server": wall_api, "transformers": wall_hf},
              "dtype": args.dtype, "lm_eval_version": versions[0] if versions else "?",
              "openai_version": md.version("openai") if _has("openai") else None,
              "commands": {"edgemoe_server": shlex.join(cmd_api), "transformers": shlex.join(cmd_hf)},
              "command": "python -m edgemoe_lab.experiments.lm_eval_local " + shlex.join(argv if argv is not None else sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    lines = ["# lm-evaluation-harness against the edgemoe server\n",
             f"lm-eval {result['lm_eval_version']}, `local-completions` model (token-id prompts, echo + logprobs "
             f"for loglikelihood) against the server on the bundled model, {args.dtype}; the same tasks on "
             "lm-eval's `hf` model (transformers) on the same weights as the baseline.", "",
             "| task | metric | edgemoe server | transformers | samples |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['edgemoe_server']:.4f} | {r['transformers']:.4f} | {r['n']} |"
              for r in rows]
    lines += ["", f"Per-choice log-likelihoods: {len(ll_api)} compared, largest difference {max_diff:.2e}.",
              f"Greedy generations identical to transformers': {same_gen}/{len(gen_api)}.",
              f"Wall time: server run {wall_api:.1f} s, transformers run {wall_hf:.1f} s (each includes lm-eval's "
              "own start-up).", "", "Commands (from the repository root; the script starts the server on a free port):",
              "", "```", result["command"], shlex.join(cmd_api), shlex.join(cmd_hf), "```"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _has(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
