"""The tiny-MoE training recipe: corpus selection and split, evaluation-text cuts, and an
end-to-end run at toy size whose output loads in edgemoe and transformers alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgemoe.checkpoint import load_hf
from edgemoe.errors import EdgeMoEError
from edgemoe_lab.train_tiny import (
    EOS,
    Document,
    Recipe,
    chat_examples,
    collect_corpus,
    eval_text,
    lr_at,
    pack,
    part_of,
    train,
)

SOURCE = '''"""Module {i}: helpers for the test corpus."""

import os


def helper_{i}(path, mode="r"):
    """Open {{path}} and return its first line number {i}."""
    with open(path, mode) as f:
        return f.readline()


class Thing{i}:
    def __init__(self, value):
        self.value = value * {i}

    def double(self):
        return self.value + self.value
'''


def fake_stdlib(root: Path, n: int = 60) -> Path:
    for i in range(n):
        pkg = root / ("pkg" if i % 3 == 0 else "") / f"mod{i}.py"
        pkg.parent.mkdir(parents=True, exist_ok=True)
        pkg.write_text(SOURCE.format(i=i))
    # Everything below must be left out of the corpus.
    for skipped in ("test/test_x.py", "pkg/tests/test_y.py", "idlelib/idle_test/z.py", "encodings/cp0.py",
                    "site-packages/lib.py", "pydoc_data/topics.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("x = 1\n")
    (root / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")  # not UTF-8
    (root / "special.py").write_text(f"s = '{EOS}'\n")  # would be read as a special token
    return root


def test_corpus_filters_and_splits_by_path(tmp_path):
    parts, skipped = collect_corpus(fake_stdlib(tmp_path))
    paths = {k: [d.path for d in v] for k, v in parts.items()}
    everything = sum(paths.values(), [])
    assert len(everything) == len(set(everything)) == 60  # every file in exactly one part
    assert skipped == ["latin1.py"]
    assert not any(p.startswith(("test/", "encodings/", "site-packages/", "pydoc_data/")) or "tests/" in p
                   or "idle_test" in p or p == "special.py" for p in everything)
    for name, ps in paths.items():
        assert ps == sorted(ps) and all(part_of(p) == name for p in ps)
    assert all(len(v) > 0 for v in parts.values())
    # The part of a file depends on its path only.
    assert part_of("json/decoder.py") == part_of("json/decoder.py")


def test_corpus_errors_on_missing_directory(tmp_path):
    with pytest.raises(EdgeMoEError, match="not found"):
        collect_corpus(tmp_path / "nope")


def test_eval_text_is_deterministic_and_cut_at_lines():
    docs = [Document(f"m{i}.py", "".join(f"line {i}.{j}\n" for j in range(100))) for i in range(20)]
    text, used = eval_text(docs, max_chars=3000, per_doc_chars=500)
    assert (text, used) == eval_text(list(reversed(docs)), 3000, 500)
    pieces = text.split(EOS)
    assert len(pieces) == len(used) and len(text) <= 3000 + len(EOS)
    for piece in pieces:
        assert piece.endswith("\n") and len(piece) <= 500


def test_chat_examples_and_packing():
    docs = [Document(f"m{i}.py", SOURCE.format(i=i)) for i in range(5)]
    convs = chat_examples(docs)
    assert len(convs) == 5
    user, assistant = convs[0]
    assert user["role"] == "user" and "Write a Python function `helper_" in user["content"]
    assert assistant["content"].startswith("def helper_") and "return f.readline()" in assistant["content"]
    windows = pack([[5, 6, 7], [8, 9]], eos=0, context=3)
    assert windows.tolist() == [[0, 5, 6], [7, 0, 8]]  # EOS before every document, tail dropped


def test_learning_rate_schedule():
    r = Recipe(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, r) == pytest.approx(0.1)
    assert lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(109, r) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, r) >= lr_at(s + 1, r) for s in range(10, 109))


def test_train_end_to_end_toy(tmp_path):
    transformers = pytest.importorskip("transformers")
    root = fake_stdlib(tmp_path / "stdlib")
    recipe = Recipe(
        vocab_size=300, hidden_size=32, layers=2, heads=2, kv_heads=1, experts=4, top_k=2, expert_dim=32,
        context=32, batch=4, steps=3, warmup=1, calib_chars=2_000, heldout_chars=2_000, per_doc_chars=800,
    )
    out = tmp_path / "out" / "model"
    record = train(recipe, out, tmp_path / "out", command="test", log=lambda *a: None, root=root)
    assert record["steps_done"] == 3 and not record["stopped_early"]
    assert json.loads((out / "training.json").read_text())["corpus"]["train"]["files"] == record["corpus"]["train"]["files"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).exists(), name
    assert (tmp_path / "out" / "heldout.txt").read_text() and (tmp_path / "out" / "calib.txt").read_text()
    # The saved directory is a plain HF Mixtral checkpoint: both loaders agree.
    ours, _ = load_hf(out, dtype="float32")
    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, recipe.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        f"{EOS}<|user|>\nhi<|end|>\n<|assistant|>\n"
    )
