"""edgemoe.rowmm: the bf16 few-rows matmul of batched decode steps, against an fp32
reference (its error no worse than torch's own bf16 matmul), its portable path, the calls
it declines, and a bf16 model decoded in a batch through it against each row alone."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_checkpoint, tiny_config

from edgemoe import cpu, rowmm

needs_kernel = pytest.mark.skipif(not rowmm.available(), reason=f"no kernel: {rowmm.library.error}")

SHAPES = [(300, 70), (128, 128), (64, 1024), (7, 33), (1, 64), (2816, 64)]
ROWS = [1, 2, 3, 4, 8, 15, 16, 17, 40]


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch_err = (F.linear(x, w, b).float() - ref).abs().max().item()
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert (y.float() - ref).abs().max().item() <= 2 * torch_err + 1e-2


@needs_kernel
@pytest.mark.parametrize("N,K", SHAPES)
def test_matches_fp32_reference(N, K):
    g = torch.Generator().manual_seed(N * K)
    for M in ROWS:
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        for b in (None, torch.randn(N, generator=g).bfloat16()):
            check(rowmm.rows_matmul(x, w, b), x, w, b)
    x3 = torch.randn(4, 1, K, generator=g).bfloat16()  # (B, T, K) as a decode step has it
    check(rowmm.rows_matmul(x3, w).reshape(4, N), x3.reshape(4, K), w, None)


@needs_kernel
def test_declines_what_it_does_not_compute():
    w = torch.randn(16, 32).bfloat16()
    x = torch.randn(2, 32).bfloat16()
    assert rowmm.rows_matmul(x.float(), w.float()) is None  # fp32: torch's kernels
    assert rowmm.rows_matmul(x.half(), w.half()) is None
    assert rowmm.rows_matmul(x, w.t().contiguous().t()) is None  # a non-contiguous weight
    assert rowmm.rows_matmul(torch.randn(rowmm.MAX_ROWS + 1, 32).bfloat16(), w) is None
    assert rowmm.rows_matmul(x, w.clone().requires_grad_()) is None
    assert rowmm.rows_matmul(x, w, torch.randn(16)) is None  # an fp32 bias
    assert rowmm.rows_matmul(x, w) is not None


@needs_kernel
def test_linear_offers_matmuls_only_inside_active():
    calls = []

    def spy(x, w, b):
        calls.append(x.shape)
        return None  # decline: torch computes

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    cpu.linear(x, w)
    with cpu.row_matmul(spy):
        y = cpu.linear(x, w)
    cpu.linear(x, w)
    assert calls == [x.shape]
    torch.testing.assert_close(y, F.linear(x, w))
    with rowmm.active():
        y = cpu.linear(x.bfloat16(), w.bfloat16())
    check(y, x.bfloat16(), w.bfloat16(), None)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_path_without_avx512_bf16(tmp_path):
    """The loop the compiler vectorises for CPUs without AVX512-BF16 (built for plain x86-64)."""
    src = tmp_path / "rowmm.c"
    src.write_text(rowmm.SOURCE)
    lib = tmp_path / "rowmm.so"
    res = subprocess.run(["cc", "-O3", "-std=c11", "-fPIC", "-shared", "-o", str(lib), str(src)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no C compiler: {res.stderr[-200:]}")
    so = rowmm._load(lib)
    assert so.em_rows_simd() == 0
    g = torch.Generator().manual_seed(0)
    for N, K in SHAPES:
        for M in (1, 4, 17):
            x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
            b = torch.randn(N, generator=g).bfloat16()
            y = torch.empty(M, N, dtype=torch.bfloat16)
            assert so.em_rows_bf16(x.data_ptr(), M, K, w.data_ptr(), N, b.data_ptr(), y.data_ptr(), 1) == 0
            check(y, x, w, b)
    assert so.em_rows_bf16(None, 0, 4, None, 4, None, None, 1) == -1


def test_env_switch_turns_it_off():
    code = "from edgemoe import rowmm; print(rowmm.available(), rowmm.simd())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDGEMOE_ROW_KERNEL": "0"})
    assert out.stdout.split() == ["False", "unavailable"], out.stderr


@needs_kernel
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_bf16_model_batched_equals_alone_exactly(tmp_path, tokenizer_dir, family):
    """A bf16 model: three sequences teacher-forced through batched steps give, bit for bit,
    the logits each gets in a step of its own (the kernel computes every row the same way
    whatever the batch, and each row attends over its own cache); torch's native step
    (Engine.generate's) is within bf16 rounding of them."""
    from edgemoe.batching import decode_rows
    from edgemoe.checkpoint import load_hf
    from edgemoe.generate import PromptCache, prefill

    out = tmp_path / "m"
    extra = dict(sliding_window=6, use_sliding_window=True) if family == "qwen3_moe" else dict(sliding_window=5)
    save_checkpoint(tiny_config(family, **extra), out, tokenizer_dir, dtype=torch.bfloat16)
    model, _ = load_hf(out)
    assert model.embed.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (4, 9, 13)]
    follow = torch.randint(2, 300, (3, 10), generator=g).tolist()  # the tokens fed after each prompt
    used = []
    real = rowmm.rows_matmul

    def counting(x, w, b=None):
        used.append(x.shape[0])
        return real(x, w, b)

    caches = [PromptCache(model, 64) for _ in prompts]
    alone = [PromptCache(model, 64) for _ in prompts]
    native = [PromptCache(model, 64) for _ in prompts]
    for c, a, n, p in zip(caches, alone, native, prompts):
        for cache in (c, a, n):
            prefill(model, p, cache, onednn=False)
    rowmm.rows_matmul = counting
    try:
        for t in range(10):
            got = decode_rows(model, [f[t] for f in follow], caches)  # (3, V)
            want = torch.cat([decode_rows(model, [f[t]], [a]) for f, a in zip(follow, alone)])
            assert torch.equal(got, want), t
            ref = torch.cat([decode_rows(model, [f[t]], [n], row_kernel=False) for f, n in zip(follow, native)])
            torch.testing.assert_close(got.float(), ref.float(), atol=0.15, rtol=0.05)
    finally:
        rowmm.rows_matmul = real
    assert used and max(used) == 3  # the batched steps went through the kernel
