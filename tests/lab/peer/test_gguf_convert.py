"""The GGUF conversion wrapper's handling of a locally trained tokenizer (the converter
itself belongs to the peers' environment and is not run here)."""

import enum
import importlib.util
import json
import sys
import types

import pytest

from edgemoe_lab.peer.runner import CHILDREN


@pytest.fixture(scope="module")
def wrapper():
    spec = importlib.util.spec_from_file_location("bench_gguf_convert", CHILDREN / "gguf_convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenizer(tmp_path, pre, normalizer=None):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre, "normalizer": normalizer}))
    return tmp_path


def test_byte_level_is_gpt2(wrapper, tmp_path):
    d = tokenizer(tmp_path, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    assert wrapper.declared_pre_tokenizer(d) == "gpt-2"


def test_other_pre_tokenizers_are_refused_clearly(wrapper, tmp_path):
    d = tokenizer(tmp_path, {"type": "Metaspace", "replacement": "▁"})
    with pytest.raises(SystemExit, match="no llama.cpp equivalent"):
        wrapper.declared_pre_tokenizer(d)


def test_missing_enum_members_become_placeholders(wrapper, tmp_path, monkeypatch):
    fake = types.ModuleType("gguf")
    fake.LlamaFileType = enum.IntEnum("LlamaFileType", {"ALL_F32": 0, "MOSTLY_F16": 1})
    monkeypatch.setitem(sys.modules, "gguf", fake)
    conv = tmp_path / "convert.py"
    conv.write_text("x = {'f16': gguf.LlamaFileType.MOSTLY_F16, 'q6_0': gguf.LlamaFileType.MOSTLY_Q6_0}\n")
    assert wrapper.add_missing_enum_members(str(conv)) == ["LlamaFileType.MOSTLY_Q6_0"]
    assert fake.LlamaFileType.MOSTLY_F16 == 1 and fake.LlamaFileType.MOSTLY_Q6_0 not in (0, 1)


def test_sentencepiece_only_vocabularies_read_the_bpe_tokenizer(wrapper, tmp_path):
    """A converter class that reads only tokenizer.model (ERNIE-4.5's) writes the
    tokenizer.json BPE vocabulary when the checkpoint has no tokenizer.model, and its own
    when it has one; classes with another set_vocab are left alone."""
    class Ernie:
        def set_vocab(self):
            return self._set_vocab_sentencepiece()

        def _set_vocab_sentencepiece(self):
            return "sentencepiece"

        def _set_vocab_gpt2(self):
            return "bpe"

    class Qwen(Ernie):
        def set_vocab(self):
            return self._set_vocab_gpt2()

    mod = types.SimpleNamespace(Ernie=Ernie, Qwen=Qwen)
    tokenizer(tmp_path, {"type": "ByteLevel"})
    assert wrapper.bpe_without_sentencepiece(mod, tmp_path) == ["Ernie"]
    assert Ernie().set_vocab() == "bpe" and Qwen().set_vocab() == "bpe"
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert Ernie().set_vocab() == "sentencepiece"
