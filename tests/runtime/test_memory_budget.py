"""The memory budget holds for a model whose experts are several times the budget, and the
converter's peak RSS stays well under the model size. Both are measured in fresh
subprocesses, so the numbers are those of a user's process."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import edgemoe
from edgemoe.cpu import onednn_supported
from edgemoe.errors import ContextLengthError, InvalidArgument
from edgemoe.store.tensorfile import read_header

from cli.helpers import assert_clean_error, run_cli

BUDGET = 150_000_000  # 10% of it (15 MB) is far above Python's allocation noise
LAYERS, EXPERTS, HIDDEN, INTER = 4, 8, 1024, 2816  # 32 experts of 17.3 MB = 554 MB (3.7x the budget)
PROMPT = "def fibonacci(n):\n    return"


def write_random_mixtral(out, tokenizer_dir) -> int:
    """A random bf16 Mixtral-shaped checkpoint with a real HF config.json, written with
    safetensors' own save_file in HF naming (one file: the worst case for mmap readers)."""
    import transformers as tf
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    cfg = tf.MixtralConfig(vocab_size=384, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                           tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(384, HIDDEN, std=1.0), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
         "lm_head.weight": rand(384, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for n, rows in (("q", HIDDEN), ("k", 256), ("v", 256)):
            t[p + f"self_attn.{n}_proj.weight"] = rand(rows, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HIDDEN)
        t[p + "block_sparse_moe.gate.weight"] = rand(EXPERTS, HIDDEN, std=0.5)
        for e in range(EXPERTS):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = rand(INTER, HIDDEN)
            t[q + "w3.weight"] = rand(INTER, HIDDEN)
            t[q + "w2.weight"] = rand(HIDDEN, INTER)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return sum(v.numel() * 2 for v in t.values())


@pytest.fixture(scope="module")
def big(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("big")
    size = write_random_mixtral(d / "hf", tokenizer_dir)
    return d, size


@pytest.fixture(scope="module")
def converted(big):
    """The big model converted in a fresh process; returns its directory and the
    converter's --json report (peak RSS and all), whichever test asks first."""
    d, size = big
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", d / "hf", d / "conv", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return d, size, json.loads(proc.stdout)


def test_convert_peak_rss_well_under_model_size(converted):
    _, size, r = converted
    over = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    assert r["experts"] == LAYERS * EXPERTS
    # Resident weights (~23 MB) plus a few expert tensors in flight; the model is 577 MB.
    assert over < size / 5, f"converter peak {over / 1e6:.0f} MB over baseline for a {size / 1e6:.0f} MB model"


# Both matmul paths: oneDNN (prefill, where the CPU sends bf16 matmuls to it) and torch's
# native kernels throughout. A CPU without AVX-512-BF16/AMX has only the second.
PATHS = [pytest.param(True, id="onednn", marks=pytest.mark.skipif(
             not onednn_supported(), reason="this CPU does not send bf16 matmuls to oneDNN")),
         pytest.param(False, id="native")]
LONG_PROMPT = " ".join(["def fibonacci(n): return n"] * 20)  # > 256 tokens: prefill chunks of many rows


@pytest.mark.parametrize("onednn", PATHS)
def test_generation_within_budget_matches_in_ram(converted, onednn):
    d = converted[0]
    info, = [edgemoe.load(d / "conv").info]  # budget arithmetic only; no weights are kept
    assert info["expert_bytes"] >= 3 * BUDGET
    flags = [] if onednn else ["--no-onednn"]
    for prompt in (PROMPT, LONG_PROMPT):
        proc = run_cli("generate", d / "conv", "--memory", BUDGET, "-p", prompt, "-n", "8", "--ignore-eos", "--json",
                       *flags, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        s = out["stats"]
        assert s["misses"] > 0 and s["evictions"] > 0 and s["budget_bytes"] == BUDGET
        assert s["budget_used_bytes"] <= BUDGET
        assert s["kv_bytes"] == s["ctx_size"] * LAYERS * 2 * 2 * 128 * 2  # layers x (K, V) x kv heads x dim x bf16
        assert s["rss_over_baseline_bytes"] <= 1.10 * BUDGET, (
            f"peak RSS {s['rss_over_baseline_bytes'] / 1e6:.1f} MB over a baseline of {s['baseline_rss_bytes'] / 1e6:.1f} MB "
            f"for a budget of {BUDGET / 1e6:.0f} MB ({s['prompt_tokens']}-token prompt)")
        assert s["bytes_read"] > 2 * BUDGET  # it really streamed experts through the cache
        ref = edgemoe.load(d / "hf", onednn=onednn)
        try:
            want = ref.generate(prompt, max_tokens=8, ignore_eos=True).token_ids
        finally:
            ref.close()
        assert out["token_ids"] == want


def test_budget_below_minimum_is_refused_with_the_minimum(converted):
    d = converted[0]
    proc = run_cli("generate", d / "conv", "--memory", "40MB", "-p", "x")
    assert_clean_error(proc, "too small", "resident weights", "KV cache", "workspace", "experts", "--memory ")
    minimum = int(re.search(r"--memory (\d+)", proc.stderr).group(1))
    infos, _ = read_header(d / "conv" / "resident.safetensors")
    resident = sum(i.nbytes for i in infos.values())
    assert minimum > resident + 2 * (3 * HIDDEN * INTER * 2)  # top-2 experts plus KV and workspace
    # The minimum it names is the real one: one byte less is refused, the minimum runs.
    assert_clean_error(run_cli("generate", d / "conv", "--memory", minimum - 1, "-p", "x"), "too small")
    ok = run_cli("generate", d / "conv", "--memory", minimum, "-p", "x", "-n", "2", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["stats"]["budget_used_bytes"] <= minimum


def test_ctx_size_is_bounded_by_the_budget(converted):
    """The default context is the model's maximum (512) unless its KV cache would take more
    than half of what the budget leaves; an explicit one must fit or is refused."""
    d = converted[0]
    roomy = edgemoe.load(d / "conv", memory=BUDGET)
    assert roomy.ctx_size == 512 and roomy.info["kv_bytes"] == 512 * LAYERS * 2 * 2 * 128 * 2
    roomy.close()
    with pytest.raises(InvalidArgument, match="513 is more than the 512 positions"):
        edgemoe.load(d / "conv", ctx_size=513)
    small = edgemoe.load(d / "conv", ctx_size=16)
    try:
        assert small.ctx_size == 16
        with pytest.raises(ContextLengthError, match="context size of 16"):
            small.generate(LONG_PROMPT, max_tokens=1)
        assert small.generate("def f", max_tokens=4, ignore_eos=True).stats.ctx_size == 16
    finally:
        small.close()
