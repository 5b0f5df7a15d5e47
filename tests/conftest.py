"""Shared fixtures: tiny random checkpoints built with transformers' own classes and a
small byte-level BPE tokenizer, saved with save_pretrained like real hub models."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# No test may reach the Hugging Face hub (hub ids are tested against a local cache); the
# environment passes this on to every subprocess.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "        self.y = y\n\nimport os\nimport sys\nfor i in range(10):\n    print(i, 'héllo wörld ✓ 你好')\n"
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route tokens.\n"
) * 20

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def write_tokenizer(out: Path, vocab_size: int = 320) -> int:
    """Train a deterministic byte-level BPE and save it in HF layout. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(d)
    return d


def tiny_config(family: str, **overrides):
    """A small config of the given family; overrides set any config field."""
    import transformers as tf

    base = dict(vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                tie_word_embeddings=False)
    if family == "mixtral":
        cfg = dict(base, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralConfig
    elif family == "qwen2_moe":
        cfg = dict(base, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                   num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
        cls = tf.Qwen2MoeConfig
    elif family == "qwen3_moe":
        cfg = dict(base, intermediate_size=128, moe_intermediate_size=48, num_experts=6,
                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=24)
        cls = tf.Qwen3MoeConfig
    elif family == "olmoe":
        cfg = dict(base, intermediate_size=48, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
        cls = tf.OlmoeConfig
    else:
        raise ValueError(family)
    cfg.update(overrides)
    return cls(**cfg)


def save_checkpoint(config, out: Path, tokenizer_dir: Path | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, init_std: float = 0.1):
    """Instantiate a random model with transformers, save it with save_pretrained, copy
    the tokenizer next to it. A larger init_std than HF's default gives routers that
    actually discriminate between experts."""
    import transformers as tf

    torch.manual_seed(seed)
    config.initializer_range = init_std
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
    return model


@pytest.fixture
def tiny_mixtral(tmp_path, tokenizer_dir) -> Path:
    out = tmp_path / "mixtral"
    save_checkpoint(tiny_config("mixtral"), out, tokenizer_dir)
    return out


_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


def pytest_unconfigure(config):
    """End the test process without the interpreter's teardown once the results are out.
    Under load, a native library's static destructors (seen once in ~20 runs after tests
    that used llguidance and server threads) aborted with "terminate called without an
    active exception" (exit 134) after every test had passed; the cause is not found yet,
    and it must not turn a green run red."""
    if "status" in _EXIT:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(_EXIT["status"])
