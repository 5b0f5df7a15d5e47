import json

import pytest

from edgemoe.errors import ModelLoadError
from edgemoe.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


def test_matches_transformers_tokenizer(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["def add(a, b):\n    return a + b", "héllo wörld ✓ 你好", "  spaces  "]:
        assert tok.encode(text) == hf.encode(text)
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(msgs) == list(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False))


def test_special_ids(tok):
    assert tok.bos_id == tok.token_to_id("<|bos|>")
    assert tok.token_to_id("<|eos|>") in tok.eos_ids
    assert tok.encode("x")[0] == tok.bos_id


def test_streaming_detokenizer_never_splits_characters(tok):
    text = "héllo wörld ✓ 你好 def f(): pass ✓✓ 你好你好"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_detokenizer_flushes_incomplete_bytes(tok):
    ids = tok.encode("你", add_special_tokens=False)
    # feed byte-level tokens of a 3-byte character one by one: nothing until complete
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    assert "".join(out) + detok.flush() == "你"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_corrupt_tokenizer_config(tmp_path, tokenizer_dir):
    for f in tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)


def test_template_from_jinja_file(tmp_path, tokenizer_dir):
    for f in tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"
