"""The bundled tiny MoE (edgemoe.assets): it loads in edgemoe and in transformers with the
same logits, keeps its measured held-out quality, routes tokens to all of its experts,
and ships a working tokenizer and chat template."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgemoe import assets
from edgemoe.checkpoint import load_hf
from edgemoe_lab.model_report import RoutingCounts, mutual_information, perplexity, usage_entropy
from edgemoe_lab.train_tiny import EOS, part_of, render_chat

CONTEXT = 256
# Held-out slice used by the perplexity test: the first 32 windows of 256 tokens of
# HELDOUT_TEXT. Measured perplexity on it: 47.25 (float32; 56.87 on the whole text). The
# threshold sits a little above, so a broken loader, tokenizer or kernel fails the test
# while float noise does not (the same model with random weights gives ~4200).
SLICE_TOKENS = 32 * CONTEXT
PPL_THRESHOLD = 48.5
MAX_MODEL_BYTES = 16_000_000


@pytest.fixture(scope="module")
def model():
    m, _ = load_hf(assets.MODEL_DIR, dtype="float32")
    return m


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(assets.MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    return tokenizer.encode(assets.HELDOUT_TEXT.read_text(encoding="utf-8")).ids


def test_assets_are_shipped_and_small():
    config = json.loads((assets.MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] >= 8 and config["num_experts_per_tok"] == 2
    assert config["num_hidden_layers"] >= 6
    assert config["dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in assets.MODEL_DIR.iterdir() if f.is_file())
    assert size <= MAX_MODEL_BYTES, f"{assets.MODEL_DIR} is {size} bytes"
    for text in (assets.CALIB_TEXT, assets.HELDOUT_TEXT):
        assert 150_000 < text.stat().st_size < 1_000_000, text


def test_calibration_and_heldout_texts_are_disjoint_from_training():
    info = json.loads((assets.MODEL_DIR / "training.json").read_text())
    calib, heldout = info["calib_text"]["documents"], info["heldout_text"]["documents"]
    # The split is by file path; the recipe trained only on "train" files.
    assert calib and heldout and not set(calib) & set(heldout)
    assert all(part_of(p) == "calib" for p in calib)
    assert all(part_of(p) == "heldout" for p in heldout)
    assert len(assets.read_documents(assets.HELDOUT_TEXT)) == len(heldout)
    assert len(assets.read_documents(assets.CALIB_TEXT)) == len(calib)


def test_logits_match_transformers(model, heldout_ids):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(assets.MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor(heldout_ids[: 2 * CONTEXT]).view(2, CONTEXT)  # (2, T): 512 held-out tokens
    with torch.inference_mode():
        ours = model(ids)  # (2, T, V)
        theirs = hf(input_ids=ids).logits  # (2, T, V)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_heldout_perplexity_and_expert_use(model, heldout_ids):
    assert len(heldout_ids) > SLICE_TOKENS
    rec = RoutingCounts(model)
    try:
        r = perplexity(model, heldout_ids[: SLICE_TOKENS + 1], CONTEXT, recorder=rec)
    finally:
        rec.detach()
    assert r["tokens"] == SLICE_TOKENS
    assert r["ppl"] < PPL_THRESHOLD, f"held-out perplexity {r['ppl']:.3f} >= {PPL_THRESHOLD}"
    # Every expert of every layer gets real traffic (the load-balancing loss did its job;
    # measured minimum share 2.5%)...
    share = rec.counts / rec.counts.sum(-1, keepdim=True)  # (L, E)
    assert share.min().item() > 0.01
    rel = [h / math.log2(rec.E) for h in usage_entropy(rec.counts)]
    assert all(h > 0.8 for h in rel), rel
    # ...and routing is structured: consecutive layers choose together (measured 0.23 to
    # 0.33 bits on this slice; random weights 0.03 to 0.12).
    mi = [mutual_information(p) for p in rec.pairs]
    assert min(mi) > 0.15, mi


def test_tokenizer_round_trip(tokenizer):
    text = assets.HELDOUT_TEXT.read_text(encoding="utf-8")[:20_000]
    for sample in (text, "def f(x):\n\treturn x  # café, 你好, ✓\r\n", "   leading spaces and trailing  "):
        assert tokenizer.decode(tokenizer.encode(sample).ids, skip_special_tokens=False) == sample
    # Documents in the shipped texts are separated by the EOS special token.
    assert tokenizer.encode(f"a{EOS}b").ids[1] == tokenizer.token_to_id(EOS)


def test_special_tokens_and_chat_template():
    config = json.loads((assets.MODEL_DIR / "config.json").read_text())
    tok_config = json.loads((assets.MODEL_DIR / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"]
    from edgemoe.tokenizer import Tokenizer

    tok = Tokenizer(assets.MODEL_DIR)
    eos = tok.token_to_id(EOS)
    end = tok.token_to_id("<|end|>")
    assert config["bos_token_id"] == eos == tok.bos_id
    assert set(config["eos_token_id"]) == {eos, end}
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function."},
        {"role": "assistant", "content": "def f():\n    pass"},
    ]
    ours = tok.apply_chat_template(messages, add_generation_prompt=False)
    # The recipe trained on exactly this rendering (after the EOS document separator).
    assert ours == EOS + render_chat(messages)
    ids = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert ids[0] == eos and ids[-2] == tok.token_to_id("<|assistant|>")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(assets.MODEL_DIR)
    assert hf.apply_chat_template(messages, tokenize=False) == ours
    assert hf.eos_token == EOS and hf.bos_token == EOS
