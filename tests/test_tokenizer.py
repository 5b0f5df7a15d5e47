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


# ----------------------------------------------------------------------------- bad tokenizer files


def copy_tokenizer(tokenizer_dir, dest):
    for f in tokenizer_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def edit(path, **changes):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def refused(path, *fragments):
    with pytest.raises(ModelLoadError) as info:
        Tokenizer(path)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize(
    "value,fragment",
    [
        (5, "got 5"),
        (["{{ x }}"], "got an entry '{{ x }}'"),
        ([{"template": "x"}], "got an entry {'template': 'x'}"),
        ([{"name": "default", "template": 3}], "got an entry"),
        ({"default": "x"}, "got {'default': 'x'}"),
    ],
)
def test_chat_template_of_the_wrong_kind(tmp_path, tokenizer_dir, value, fragment):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "tokenizer_config.json", chat_template=value)
    refused(tmp_path, str(tmp_path / "tokenizer_config.json"), "chat_template must be a string or a list", fragment)


def test_named_chat_templates_use_default(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "tokenizer_config.json",
         chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert Tokenizer(tmp_path).chat_template == "D"
    edit(tmp_path / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "T"}])
    assert Tokenizer(tmp_path).chat_template == "T"


@pytest.mark.parametrize("value", [{"id": 1}, {"content": 1}, {}, 1, ["<|eos|>"]])
def test_special_token_of_the_wrong_kind(tmp_path, tokenizer_dir, value):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "tokenizer_config.json", eos_token=value)
    refused(tmp_path, str(tmp_path / "tokenizer_config.json"), "eos_token must be a string or an object")


def test_special_token_objects_and_special_tokens_map(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|eos|>", "lstrip": False}
    del cfg["bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    edit(tmp_path / "special_tokens_map.json", bos_token={"content": "<|bos|>"})
    tok = Tokenizer(tmp_path)
    assert tok.eos_token == "<|eos|>" and tok.bos_id == tok.token_to_id("<|bos|>")
    edit(tmp_path / "special_tokens_map.json", bos_token={"text": "<|bos|>"})  # the map is named when it is wrong
    refused(tmp_path, str(tmp_path / "special_tokens_map.json"), "bos_token")


@pytest.mark.parametrize("value", ["x", {"a": 1}, [1, "2"], [-1], True])
def test_generation_config_eos_of_the_wrong_kind(tmp_path, tokenizer_dir, value):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "generation_config.json", eos_token_id=value)
    refused(tmp_path, str(tmp_path / "generation_config.json"), "eos_token_id must be")


def test_generation_config_eos_ids_are_added(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "generation_config.json", eos_token_id=[7, 9])
    assert {7, 9} <= Tokenizer(tmp_path).eos_ids


def test_tokenizer_config_that_is_not_an_object(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    refused(tmp_path, str(tmp_path / "tokenizer_config.json"), "expected a JSON object")


def test_chat_template_file_that_is_not_utf8(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ \xff }}")
    refused(tmp_path, str(tmp_path / "chat_template.jinja"), "not valid UTF-8")


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages + 1 }}", "{{ raise_exception('nope') }}",
                                      "{{ 1 / 0 }}"])
def test_failing_chat_template_names_its_file(tmp_path, tokenizer_dir, template):
    copy_tokenizer(tokenizer_dir, tmp_path)
    edit(tmp_path / "tokenizer_config.json", chat_template=template)
    tok = Tokenizer(tmp_path)  # a template is only needed, and only reported, for chat
    with pytest.raises(ModelLoadError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(info.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: chat template failed")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- vocabulary size


def add_tokens(path, n):
    """Add n special tokens to tokenizer.json, as tokenizer.add_tokens would."""
    data = json.loads((path / "tokenizer.json").read_text())
    start = max(max(data["model"]["vocab"].values()), max(t["id"] for t in data["added_tokens"])) + 1
    for i in range(start, start + n):
        data["added_tokens"].append({"id": i, "content": f"<|extra{i}|>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(data))
    return start + n - 1


def test_check_vocab(tmp_path, tokenizer_dir):
    copy_tokenizer(tokenizer_dir, tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.max_token_id() == tok.vocab_size - 1 == 319
    tok.check_vocab(320, "config.json")  # exactly enough rows
    tok.check_vocab(384, "config.json")  # models pad their embedding: fine
    with pytest.raises(ModelLoadError) as info:
        tok.check_vocab(300, "/m/config.json")
    msg = str(info.value)
    assert str(tmp_path / "tokenizer.json") in msg and "320 token ids" in msg and "vocab_size 300" in msg
    assert "/m/config.json" in msg
    top = add_tokens(tmp_path, 70)  # ids 320..389: beyond a 384-row embedding
    tok = Tokenizer(tmp_path)
    assert tok.max_token_id() == top == 389
    with pytest.raises(ModelLoadError, match="390 token ids .* vocab_size 384"):
        tok.check_vocab(384, "config.json")
    assert tok.encode("<|extra389|>", add_special_tokens=False) == [389]


def test_check_vocab_counts_post_processor_ids(tmp_path, tokenizer_dir):
    """A post-processor may insert special ids that are not in the vocabulary."""
    copy_tokenizer(tokenizer_dir, tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"]["special_tokens"]["<|bos|>"]["ids"] = [500]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer(tmp_path)
    assert tok.encode("x")[0] == 500 and tok.max_token_id() == 500
    with pytest.raises(ModelLoadError, match="501 token ids"):
        tok.check_vocab(384, "config.json")


def test_load_refuses_a_tokenizer_larger_than_the_model(tiny_mixtral):
    """Tokens added to the tokenizer without resizing the model (vocab_size 384) used to
    fail with IndexError in the embedding during generation; edgemoe.load refuses them."""
    import edgemoe

    add_tokens(tiny_mixtral, 70)
    with pytest.raises(ModelLoadError) as info:
        edgemoe.load(tiny_mixtral)
    msg = str(info.value)
    assert str(tiny_mixtral / "tokenizer.json") in msg and "390 token ids" in msg and "vocab_size 384" in msg


# ----------------------------------------------------------------------------- invalid Unicode


def test_invalid_unicode_is_encoded_as_replacement_characters(tok):
    want = tok.encode("def \ufffd x")
    assert tok.encode("def \udcff x") == want  # invalid UTF-8 byte via surrogateescape (command line)
    assert tok.encode("def \ud800 x") == want  # lone surrogate from JSON "\ud800"
    assert tok.encode(b"def \xff x") == want  # bytes are decoded as UTF-8
    assert tok.encode("a\ud83d\ude00b") == tok.encode("a\U0001f600b")  # a surrogate pair is its character
    assert tok.encode("héllo") == tok.encode("héllo".encode())


def test_invalid_unicode_in_chat_messages(tok):
    msgs = [{"role": "user", "content": "hi \udcff\ud800"}]
    text = tok.apply_chat_template(msgs)
    assert "hi \ufffd\ufffd" in text
    text.encode("utf-8")  # printable and encodable
    assert tok.encode_chat(msgs) == tok.encode_chat([{"role": "user", "content": "hi \ufffd\ufffd"}])


def test_cli_prompt_with_invalid_utf8(tiny_mixtral):
    """`edgemoe generate -p "$(printf 'def \\xff')"`: Python sees U+DCFF; it is generated
    from, as U+FFFD, not a TypeError from the tokenizers library."""
    from cli.helpers import run_cli

    for extra in ([], ["--chat"]):
        proc = run_cli("generate", tiny_mixtral, "-p", "def \udcff", "--max-tokens", "2", *extra)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
