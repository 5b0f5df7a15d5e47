"""Language codes of translation models (NLLB-MoE): `target_lang` and `source_lang`
through the Engine, `edgemoe generate --target-lang/--source-lang` and the server's
/v1/completions fields. The reference is transformers on the same weights: its
NllbTokenizer(src_lang=...) for the source (both template forms: the current
[code] text </s> and the legacy text </s> [code]) and generate(forced_bos_token_id=...)
for the greedy target. Models without language codes (Switch Transformers,
decoder-only) refuse both options by name."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import requests
import torch

import edgemoe
from edgemoe.errors import ContextLengthError, InvalidArgument
from edgemoe.server import make_server
from edgemoe.store.convert import convert

from conftest import save_checkpoint, tiny_config
from models import seq2seq_parity as sp
from models.families import test_nllb_moe as nllb
from models.families import test_switch_transformers as switch
from test_seq2seq_engine import cli, one_thread  # noqa: F401 (one_thread: an autouse fixture, one torch thread)

TEXT = "the quick fox hid in the quiet hut."
LANGS = ["eng_Latn", "deu_Latn", "fra_Latn"]
NEW = 10
CTX = 48

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


def save_nllb_tokenizer(out, legacy: bool = False) -> None:
    """A tiny NLLB tokenizer (transformers' own class): letters, a few merges and three
    language codes as special tokens, saved with save_pretrained (src_lang eng_Latn)."""
    from transformers import NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.,", "▁", "▁t", "th", "▁th", "▁q"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("t", "h"), ("▁t", "h"), ("▁", "q")]
    tok = NllbTokenizer(vocab=vocab, merges=merges, extra_special_tokens=LANGS, legacy_behaviour=legacy)
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def nllb_dirs(tmp_path_factory):
    """(the transformers model, its directory, a copy with a legacy-form tokenizer, its
    conversion, the conversion's smallest budget)."""
    d = tmp_path_factory.mktemp("nllb")
    hf = sp.save(nllb.SEQ2SEQ_CONFIGS["nllb-moe-untied-fraction"](), d / "hf")
    save_nllb_tokenizer(d / "hf")
    legacy = d / "legacy"
    shutil.copytree(d / "hf", legacy)
    save_nllb_tokenizer(legacy, legacy=True)
    conv = convert(d / "hf", d / "conv").out
    with edgemoe.load(conv, ctx_size=CTX) as probe:
        smallest = probe.info["min_budget_bytes"]
    return hf, d / "hf", legacy, conv, smallest


@pytest.fixture(scope="module")
def engine(nllb_dirs):
    with edgemoe.load(nllb_dirs[1], ctx_size=CTX) as e:
        yield e


def hf_source(path, lang: str, legacy: bool = False) -> list[int]:
    from transformers import NllbTokenizer

    return NllbTokenizer.from_pretrained(path, src_lang=lang, legacy_behaviour=legacy)(TEXT).input_ids


def hf_translate(hf, path, source: list[int], target_lang: str, n: int) -> list[int]:
    """transformers' greedy target for `source`, forced to start with the target
    language (its generate counts that token among the new ones; ours is the decoder
    prompt's, so `n` tokens follow it)."""
    from transformers import NllbTokenizer

    code = NllbTokenizer.from_pretrained(path).convert_tokens_to_ids(target_lang)
    hf.generation_config.eos_token_id = None  # pure greedy on both sides
    with sp.reference(nllb):
        out = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=n + 1, min_new_tokens=n + 1,
                          forced_bos_token_id=code)[0].tolist()
    assert out[:2] == [hf.config.decoder_start_token_id, code]
    return out[2:]


@pytest.mark.parametrize("legacy", [False, True], ids=["prefix", "legacy"])
def test_source_lang_follows_transformers(nllb_dirs, legacy):
    """A text source reads as transformers' NllbTokenizer(src_lang=...) encodes it, in the
    template form the tokenizer was saved with; ids from the saved template take the
    code in the same place; ids without a language code there are refused."""
    path = nllb_dirs[2] if legacy else nllb_dirs[1]
    with edgemoe.load(path, ctx_size=CTX) as e:
        t2t = e.text2text
        assert t2t.source(TEXT, None) == e.tokenize(TEXT) == hf_source(path, "eng_Latn", legacy)
        for lang in LANGS:
            want = hf_source(path, lang, legacy)
            assert want[-1 if legacy else 0] == e.tokenizer.token_to_id(lang)
            assert t2t.source(TEXT, lang) == want
            assert t2t.source(e.tokenize(TEXT), lang) == want
        with pytest.raises(InvalidArgument, match="^source_lang: the prompt's token ids hold no language code"):
            t2t.source([5, 6, 7], "deu_Latn")


def test_target_lang_matches_forced_bos(nllb_dirs, engine):
    """Greedy tokens with target_lang (and source_lang) equal transformers'
    generate(forced_bos_token_id=...) on the same weights, in RAM and converted under the
    smallest budget; the language code is the decoder prompt's, not a generated token."""
    hf, path, _, conv, smallest = nllb_dirs
    for source_lang in (None, "deu_Latn"):
        source = hf_source(path, source_lang or "eng_Latn")
        for target_lang in ("fra_Latn", "deu_Latn"):
            want = hf_translate(hf, path, source, target_lang, NEW)
            r = engine.generate(TEXT, max_tokens=NEW, ignore_eos=True, target_lang=target_lang,
                                source_lang=source_lang)
            assert r.token_ids == want and r.stats.prompt_tokens == len(source)
    plain = engine.generate(TEXT, max_tokens=NEW, ignore_eos=True).token_ids
    assert plain != want  # the language code changes the translation
    with edgemoe.load(conv, memory=smallest, ctx_size=CTX) as offloaded:
        r = offloaded.generate(TEXT, max_tokens=NEW, ignore_eos=True, target_lang="deu_Latn", source_lang="deu_Latn")
        assert r.token_ids == want and r.stats.extra["misses"] > 0


def test_refusals_and_context(engine, nllb_dirs, tmp_path, tokenizer_dir):
    """A code that is not one special token of the vocabulary is refused naming the option
    and the code; the target language takes one place of the target's context; models
    without language codes (Switch, decoder-only) refuse both options by name."""
    for option in ("target_lang", "source_lang"):
        with pytest.raises(InvalidArgument, match=f"^{option} 'xyz_Latn': not one token of this model's vocabulary"):
            engine.generate(TEXT, max_tokens=1, **{option: "xyz_Latn"})
        with pytest.raises(InvalidArgument, match=f"^{option} 'th': a word of this model's vocabulary, not a "):
            engine.generate(TEXT, max_tokens=1, **{option: "th"})
        with pytest.raises(InvalidArgument, match=f"^{option} must be a language code"):
            engine.generate(TEXT, max_tokens=1, **{option: 5})
    assert len(engine.generate(TEXT, max_tokens=CTX, ignore_eos=True).token_ids) == CTX
    with pytest.raises(ContextLengthError, match=f"max_tokens \\({CTX}\\) is more than the {CTX - 1} target tokens"):
        engine.generate(TEXT, max_tokens=CTX, target_lang="deu_Latn")
    r = engine.generate(TEXT, target_lang="deu_Latn", ignore_eos=True)  # the default max_tokens fits
    assert len(r.token_ids) == CTX - 1

    sp.save(next(iter(switch.SEQ2SEQ_CONFIGS.values()))(), tmp_path / "switch", gain=switch.GAIN)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "switch" / f.name)
    save_checkpoint(tiny_config("mixtral"), tmp_path / "mixtral", tokenizer_dir)
    for model, why in (("switch", "switch_transformers takes no language codes"),
                       ("mixtral", "mixtral is a decoder-only model; language codes are for encoder-decoder")):
        with edgemoe.load(tmp_path / model) as e:
            for option in ("target_lang", "source_lang"):
                with pytest.raises(InvalidArgument, match=f"^{option}: {why}"):
                    e.generate("hello", max_tokens=1, **{option: "deu_Latn"})


def test_cli_generate_languages(nllb_dirs, engine):
    """`edgemoe generate --target-lang CODE --source-lang CODE` gives the Engine's tokens;
    an unknown code is a one-line error naming it."""
    path = nllb_dirs[1]
    want = engine.generate(TEXT, max_tokens=NEW, ignore_eos=True, target_lang="fra_Latn",
                           source_lang="deu_Latn").token_ids
    code, out, err = cli("generate", path, "-p", TEXT, "-n", NEW, "--ignore-eos", "--ctx-size", CTX, "--json",
                         "-t", 1, "--target-lang", "fra_Latn", "--source-lang", "deu_Latn")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == want
    code, out, err = cli("generate", path, "-p", TEXT, "-n", 2, "-t", 1, "--target-lang", "klingon")
    assert code == 1 and "target_lang 'klingon': not one token" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def url(nllb_dirs):
    e = edgemoe.load(nllb_dirs[1], ctx_size=CTX)
    server = make_server(e, port=0, model_name="nllb")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    e.close()


def test_server_language_fields(url, engine):
    """/v1/completions takes target_lang and source_lang (extension fields): the Engine's
    translation; a bad code is a 400 naming the field; the target language takes one
    place of the context when the server picks max_tokens."""
    opts = dict(max_tokens=NEW, ignore_eos=True, target_lang="fra_Latn", source_lang="deu_Latn")
    want = engine.generate(TEXT, **opts)
    body = requests.post(f"{url}/v1/completions", json={"prompt": TEXT, "temperature": 0, **opts}).json()
    assert body["choices"][0]["text"] == want.text and body["usage"]["completion_tokens"] == NEW
    assert body["usage"]["prompt_tokens"] == want.stats.prompt_tokens
    for field, value, status in (("target_lang", "xyz_Latn", 400), ("target_lang", 3, 400),
                                 ("source_lang", "xyz_Latn", 400), ("source_lang", ["deu_Latn"], 400)):
        r = requests.post(f"{url}/v1/completions", json={"prompt": TEXT, "max_tokens": 1, field: value})
        assert r.status_code == status, r.text
        assert field in r.json()["error"]["message"]
        if field == "target_lang" or not isinstance(value, str):
            assert r.json()["error"]["param"] == field
    r = requests.post(f"{url}/v1/completions", json={"prompt": TEXT, "target_lang": "deu_Latn", "ignore_eos": True,
                                                     "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == CTX - 1
