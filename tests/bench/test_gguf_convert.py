"""The GGUF conversion wrapper's handling of a locally trained tokenizer (the converter
itself belongs to the peers' environment and is not run here)."""

import enum
import importlib.util
import json
import sys
import types

import pytest

from edgemoe.bench.runner import CHILDREN


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
