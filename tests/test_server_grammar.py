"""The pieces behind the server's logprobs and response_format: token bytes for both
vocabulary styles edgemoe supports, and the llguidance logits processor on its own."""

import json

import pytest
import torch

import edgemoe
from edgemoe.errors import InvalidArgument
from edgemoe.grammar import Grammar, GrammarTokenizer, json_schema_grammar, parse_response_format
from edgemoe.logprobs import TokenText, chat_logprobs, completion_logprobs
from edgemoe.generate import TokenLogprob
from edgemoe.tokenizer import Tokenizer


def metaspace_tokenizer(out):
    """A Llama/Mixtral-style vocabulary: Metaspace pieces and <0xNN> byte-fallback tokens."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import CORPUS

    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                          show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return Tokenizer(out)


def test_token_bytes_byte_level_and_byte_fallback(tmp_path):
    bundled = edgemoe.load().tokenizer
    text = "héllo 你好 wörld"
    for tok in (bundled, metaspace_tokenizer(tmp_path / "ms")):
        tt = TokenText(tok)
        ids = tok.encode(text, add_special_tokens=False)
        spelled = b"".join(tt.bytes(i) for i in ids).decode()
        assert spelled.strip() == text  # Metaspace puts a "▁" (a space) before the first word
    tt = TokenText(metaspace_tokenizer(tmp_path / "ms2"))
    assert tt.bytes(3 + 0xE4) == b"\xe4" and tt.text(3 + 0xE4) == "\ufffd"  # <0xE4>: one byte of a character


def test_logprob_shapes():
    tt = TokenText(edgemoe.load().tokenizer)
    a, b = 76, 80
    entries = [None, TokenLogprob(b, -0.5, [(b, -0.5), (a, -1.0)])]
    out = completion_logprobs(tt, entries, [a, b])
    assert out["token_logprobs"] == [None, -0.5] and out["top_logprobs"][0] is None
    assert out["text_offset"] == [0, len(tt.text(a))] and list(out["top_logprobs"][1].values()) == [-0.5, -1.0]
    chat = chat_logprobs(tt, entries[1:])
    assert chat[0]["bytes"] == list(tt.bytes(b)) and [t["logprob"] for t in chat[0]["top_logprobs"]] == [-0.5, -1.0]


def test_grammar_processor_masks_and_follows_the_context():
    engine = edgemoe.load()
    gtok = GrammarTokenizer(engine.tokenizer, engine.vocab_limit)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    proc = Grammar(gtok, json_schema_grammar(schema)).processor()
    prompt = engine.tokenize("x")
    ids, text = list(prompt), ""
    for _ in range(30):
        scores = proc(ids, torch.zeros(engine.vocab_limit))
        allowed = torch.isfinite(scores).nonzero().flatten().tolist()
        assert allowed
        token = allowed[0] if not set(allowed) <= engine.tokenizer.eos_ids else None
        if token is None:
            break  # only end of sequence is left
        ids.append(token)
        text += engine.tokenizer.decode([token])
    assert json.loads(text) in ({"ok": True}, {"ok": False})


def test_bad_formats_and_schemas():
    engine = edgemoe.load()
    gtok = GrammarTokenizer(engine.tokenizer, engine.vocab_limit)
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == {"type": "object"}
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
                "json", {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}):
        with pytest.raises(InvalidArgument):
            parse_response_format(bad)
    with pytest.raises(InvalidArgument):
        Grammar(gtok, json_schema_grammar({"type": "object", "properties": {"a": {"type": "nonsense"}}}))


def test_tokenizer_without_eos_is_refused(tmp_path):
    tok = metaspace_tokenizer(tmp_path / "ms")
    tok.eos_ids = set()
    with pytest.raises(InvalidArgument, match="end-of-sequence"):
        GrammarTokenizer(tok, 400)
