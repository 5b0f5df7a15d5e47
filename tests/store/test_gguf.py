"""`edgemoe convert MODEL.gguf OUT`: GGUF files written from tiny transformers checkpoints
the way llama.cpp writes them (tests/store/gguf_helpers.py), converted and checked
against transformers.

- F16: the source checkpoint is saved in fp16, so the GGUF holds exactly its weights and
  the converted model (fp32 compute) must give transformers' logits within 1e-3.
- Q8_0, Q4_0, Q4_K: reading must be exact (logits of the in-RAM model equal those of
  transformers running the GGUF's own dequantized weights), and storing the experts in
  our formats may add no more error than quantizing the original weights to the same
  format directly would have (+50 % slack): re-quantizing a GGUF must not cost more than
  starting from the original checkpoint.
- Greedy tokens are identical in RAM (io-free) and offloaded under a budget.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, CORPUS, save_checkpoint, tiny_config

import edgemoe
from edgemoe.errors import ModelLoadError
from edgemoe.store.convert import convert
from edgemoe.store.manifest import read_manifest
from edgemoe.store.gguf import GGUFCheckpoint, build_tokenizer_files, permute_qk, unpermute_qk
from edgemoe.tokenizer import Tokenizer

from cli.helpers import assert_clean_error, run_cli
from store.gguf_helpers import (
    llama_cpp_permute, quantize_q4_k, reference_model, spm_tokenizer, write_gguf, write_spm_gguf,
)
from store.helpers import min_budget, offloaded_prompts, run_prompts

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TEXTS = [CORPUS[:400], "héllo wörld ✓ 你好  spaces   and\ttabs\n\nnewlines 12345 don't",
         "<|user|>hi<|end|><|assistant|>", " leading space", ""]


def ids(vocab: int, batch: int = 2, n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def f16(tmp_path_factory, tokenizer_dir):
    """family -> (transformers model in fp32, converted dir, GGUF path) for an F16 GGUF."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"gguf-{family}")
        hf = save_checkpoint(tiny_config(family), d / "hf", tokenizer_dir, dtype=torch.float16).float()
        (gguf_file,), _ = write_gguf(hf, tokenizer_dir, d / f"{family}-F16.gguf", "F16", chat_template=CHAT_TEMPLATE)
        convert(gguf_file, d / "out", dtype="float32")
        out[family] = (hf, d / "out", gguf_file)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_f16_logits_match_transformers(f16, family):
    hf, out, _ = f16[family]
    m = read_manifest(out)
    assert m.model_type == family and m.dtype == "float32" and set(m.formats) == {"fp32"}
    x = ids(hf.config.vocab_size)
    engine = edgemoe.load(out, mode="io-free")
    try:
        got = engine.model(x)
    finally:
        engine.close()
    torch.testing.assert_close(got, hf(x).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_greedy_tokens_in_ram_and_offloaded(f16, family):
    _, out, _ = f16[family]
    engine = edgemoe.load(out, mode="io-free")
    try:
        want = run_prompts(engine)
    finally:
        engine.close()
    engine = edgemoe.load(out, memory=min_budget(out), cache_policy="lru")
    try:
        assert run_prompts(engine) == want
        assert engine.info["kind"] == "converted"
    finally:
        engine.close()


def test_config_from_metadata(f16):
    for family, (hf, out, _) in f16.items():
        cfg = json.loads((out / "config.json").read_text())
        src = hf.config
        assert cfg["model_type"] == family
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            assert cfg[key] == getattr(src, key), (family, key)
        assert cfg["rms_norm_eps"] == src.rms_norm_eps  # float32 metadata read back as 1e-05, not 9.99e-06
        assert cfg["gguf"]["architecture"] == {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                                               "olmoe": "olmoe"}[family]
    assert json.loads((f16["qwen3_moe"][1] / "config.json").read_text())["head_dim"] == 24
    assert json.loads((f16["qwen2_moe"][1] / "config.json").read_text())["shared_expert_intermediate_size"] == 80


def test_tokenizer_and_chat_template_kept(f16, tokenizer_dir):
    """The tokenizer built from the GGUF vocabulary encodes like the source tokenizer, and
    the chat template stored in the metadata renders the same prompt."""
    _, out, _ = f16["qwen2_moe"]
    ours, theirs = Tokenizer(out), Tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    messages = [{"role": "user", "content": "hi ✓"}]
    assert ours.encode_chat(messages) == theirs.encode_chat(messages)
    assert ours.bos_token == "<|bos|>" and ours.eos_ids == theirs.eos_ids


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_bpe_tokenizer_matches_transformers_gguf_loader(tmp_path, tokenizer_dir, pre):
    """transformers' own GGUF tokenizer conversion is the reference for the split rules."""
    import gguf
    from transformers import AutoTokenizer

    from store.gguf_helpers import add_tokenizer

    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(path, "qwen2moe")
    add_tokenizer(w, tokenizer_dir, 384, pre=pre)
    w.add_tensor("token_embd.weight", np.zeros((384, 8), dtype=np.float32))
    finish(w)
    files = build_tokenizer_files(_meta(path), path)
    d = tmp_path / "built"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    ours = Tokenizer(d)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["I'M 1234567 LLaMA's", "a\r\n\r\nb   c"]:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), (pre, text)


def llama_cpp_split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece further, keeping
    both its matches and the text between them (with the `regex` module, an engine
    independent of the tokenizers library's)."""
    import regex

    pieces = [text]
    for r in regexes:
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(r, p):
                out += [x for x in (p[at:m.start()], m.group()) if x]
                at = m.end()
            if at < len(p):
                out.append(p[at:])
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", ["gpt-4o", "llama4", "deepseek-v3", "glm4", "hunyuan", "qwen2", "refact"])
def test_pre_tokenizers_split_as_llama_cpp(tmp_path, pre):
    """The pre-tokenizer built for each tokenizer.ggml.pre splits text into the pieces
    llama.cpp's regexes give (before the byte-level mapping)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from edgemoe.store.gguf import PRE_TOKENIZERS

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    tok = HFTokenizer.from_str(build_tokenizer_files(meta, tmp_path / "t.gguf")["tokenizer.json"].decode())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    texts = ["I'M 1234567 LLaMA's don'T stop", "héllo wörld ✓ 你好世界 カタカナ ひらがな 12,345.67",
             "a\r\n\r\nb   c\t\td  ", "x=foo(bar)/2; // ok?!", "HTTPRequest getHTTP 3rd", "Ünïcödé ÀB àb"]
    for text in texts:
        want = [byte_level.pre_tokenize_str(p)[0][0] for p in llama_cpp_split(text, PRE_TOKENIZERS[pre])]
        assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == want, (pre, text)


def test_sentencepiece_tokenizer(tmp_path):
    """A llama-type (SentencePiece) vocabulary, as Mixtral GGUFs store it: tokens, scores
    and types, no merges. Same ids as the source tokenizer and as transformers' loader."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    tok_file = spm_tokenizer(tmp_path / "spm")
    path = write_spm_gguf(tok_file, tmp_path / "spm.gguf")
    d = tmp_path / "built"
    d.mkdir()
    for name, data in build_tokenizer_files(_meta(path), path).items():
        (d / name).write_bytes(data)
    ours, src = Tokenizer(d), HFTokenizer.from_file(str(tok_file))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS[:2] + ["Mixture of experts models route tokens.", "x ✓ 你好"]:
        got = ours.encode(text)
        assert got[0] == ours.bos_id and got[1:] == src.encode(text).ids, text  # add_bos, then the same pieces
        assert got == ref.encode(text), text
        assert ours.decode(got) == text


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _meta(path):
    from edgemoe.store.gguf import _metadata, _open_one

    return _metadata(_open_one(path), path)


# ----------------------------------------------------------------------------- quantized

QUANT = {"Q8_0": "int8", "Q4_0": "int4-asym", "Q4_K": "int4-asym"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tokenizer_dir):
    """A Mixtral with 256-wide rows (every GGUF block type fits), HF's init scale, its
    quantized GGUFs (all weights in the type, as llama-quantize writes them), converted."""
    d = tmp_path_factory.mktemp("gguf-quant")
    cfg = tiny_config("mixtral", hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    hf = save_checkpoint(cfg, d / "hf", tokenizer_dir, init_std=0.02)
    x = ids(cfg.vocab_size, n=24)
    with torch.no_grad():
        src = hf(x).logits
    out = {}
    for qtype, fmt in QUANT.items():
        (gguf_file,), deq = write_gguf(hf, tokenizer_dir, d / f"m-{qtype}.gguf", qtype)
        with torch.no_grad():
            ref = reference_model(hf, deq)(x).logits  # what the GGUF's own weights compute
        result = convert(gguf_file, d / qtype, dtype="float32")
        direct = d / f"{qtype}-direct"
        convert(d / "hf", direct, dtype="float32", fmt=fmt)
        out[qtype] = dict(gguf=gguf_file, out=d / qtype, result=result, ref=ref, src=src, direct=direct)
    return hf, x, out


@pytest.mark.parametrize("qtype", sorted(QUANT))
@torch.no_grad()
def test_quantized_gguf_reads_exactly_and_requantizes_within_budget(quantized, qtype):
    hf, x, runs = quantized
    r = runs[qtype]
    assert r["result"].formats == {QUANT[qtype]: 12}  # the default plan keeps the GGUF's bits
    # Reading: everything dequantized in RAM equals transformers on the GGUF's weights.
    ckpt = GGUFCheckpoint(r["gguf"])
    exact = convert(r["gguf"], r["out"].with_name(r["out"].name + "-fp32"), dtype="float32", fmt="fp32")
    assert set(exact.added_error) == {f"{qtype} -> fp32"} and exact.added_error[f"{qtype} -> fp32"]["rel_rms"] == 0
    engine = edgemoe.load(exact.out, mode="io-free")
    try:
        torch.testing.assert_close(engine.model(x), r["ref"], atol=1e-4, rtol=0)
    finally:
        engine.close()
    # Storing: the error our formats add, against quantizing the original directly.
    engine, direct = edgemoe.load(r["out"], mode="io-free"), edgemoe.load(r["direct"], mode="io-free")
    try:
        ours, base = engine.model(x), direct.model(x)
        want = run_prompts(engine)
    finally:
        engine.close(), direct.close()
    added, own, direct_err = rms(ours, r["ref"]), rms(r["ref"], r["src"]), rms(base, r["src"])
    assert 0 < added <= 1.5 * direct_err, (added, direct_err)
    assert rms(ours, r["src"]) <= 1.1 * (own + direct_err)
    # The conversion reports the added weight error it measured (relative RMS).
    (name, e), = r["result"].added_error.items()
    assert name == f"{qtype} -> {QUANT[qtype]}" and e["experts"] == 12
    assert 0 < e["rel_rms"] <= e["worst"] < (0.015 if qtype == "Q8_0" else 0.12)
    # Offloaded under a small budget: the same tokens as in RAM.
    assert offloaded_prompts(r["out"]) == want
    assert ckpt.expert_types()[(0, 0)] == (qtype,) * 3


def test_q4_k_encoder_of_the_tests_is_valid():
    """The tests' own Q4_K writer (the gguf package has no K-quant quantizer) round-trips
    through gguf's dequantizer within Q4_K's precision."""
    import gguf

    w = np.random.default_rng(0).normal(0, 0.02, (8, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q4_k(w), gguf.GGMLQuantizationType.Q4_K)
    assert back.shape == w.shape and np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()) < 0.12


def test_unpermute_inverts_llama_cpp():
    w = torch.randn(48, 16)
    for heads in (1, 2, 4, 6):
        p = torch.from_numpy(llama_cpp_permute(w.numpy(), heads, None))
        assert torch.equal(unpermute_qk(p, heads), w) and torch.equal(permute_qk(w, heads), p)
    assert not torch.equal(unpermute_qk(w, 4), w)


# ----------------------------------------------------------------------------- layouts


def test_split_gguf_and_legacy_expert_tensors(tmp_path, tokenizer_dir):
    hf = save_checkpoint(tiny_config("mixtral"), tmp_path / "hf", tokenizer_dir, dtype=torch.float16).float()
    (one,), _ = write_gguf(hf, tokenizer_dir, tmp_path / "one.gguf", "F16")
    parts, _ = write_gguf(hf, tokenizer_dir, tmp_path / "split.gguf", "F16", split_max_tensors=12)
    assert [p.name for p in parts] == [f"split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]  # 33 tensors
    (legacy,), _ = write_gguf(hf, tokenizer_dir, tmp_path / "legacy.gguf", "F16", legacy_experts=True)
    a = GGUFCheckpoint(one)
    want = {k: v for k, v in a.tensors()}
    for path in (parts[0], parts[2], legacy):  # any part of a split set names the whole set
        b = GGUFCheckpoint(path)
        assert b.config == {**a.config, "gguf": {**a.config["gguf"], "file": b.files[0].name}}
        got = dict(b.tensors())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    parts[1].unlink()
    with pytest.raises(ModelLoadError, match=r"split-00002-of-00003\.gguf is missing"):
        GGUFCheckpoint(parts[0])


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_gguf(f16):
    return f16["olmoe"][2]


def _write(tmp_path, arch="qwen3moe", tokenizer=True, tensors=None, **kv):
    import gguf

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    for k, v in kv.items():
        getattr(w, f"add_{k}")(v)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])
    for name, (arr, raw) in (tensors or {"token_embd.weight": (np.zeros((3, 8), np.float32), None)}).items():
        w.add_tensor(name, arr, raw_dtype=raw)
    finish(w)
    return path


def test_truncated_and_corrupted_files_are_clean_errors(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # inside the tensor data
    assert_clean_error(run_cli("convert", cut, tmp_path / "o1"), str(cut), "truncated")
    for n in (3, 30, 2000):  # magic, counts, metadata
        cut.write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="cut.gguf: (truncated|corrupted|not a GGUF)"):
            GGUFCheckpoint(cut)
    bad = bytearray(data)
    bad[16:24] = struct.pack("<Q", 1 << 40)  # kv_count
    cut.write_bytes(bytes(bad))
    with pytest.raises(ModelLoadError, match="truncated or corrupted"):
        GGUFCheckpoint(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    assert_clean_error(run_cli("convert", junk, tmp_path / "o2"), str(junk), "not a GGUF file")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unknown_architecture_and_dense_models(tmp_path):
    path = _write(tmp_path, arch="gemma3")
    assert_clean_error(run_cli("convert", path, tmp_path / "o"), str(path), "unsupported GGUF architecture 'gemma3'",
                       "qwen3moe")
    path = _write(tmp_path, arch="llama")
    with pytest.raises(ModelLoadError, match="dense llama model"):
        GGUFCheckpoint(path)
    # A family edgemoe has, whose GGUF layout it does not read: pointed to the checkpoint.
    path = _write(tmp_path, arch="qwen3next")
    assert_clean_error(run_cli("convert", path, tmp_path / "o"), str(path),
                       "GGUF architecture 'qwen3next' (Qwen3-Next) is not supported yet",
                       "edgemoe convert HF_DIR OUT_DIR")


def test_unsupported_tensor_type(tmp_path, small_gguf):
    import gguf

    path = _write(tmp_path, tensors={"token_embd.weight": (np.zeros((3, 8), np.int32), None)})
    with pytest.raises(ModelLoadError, match=r"unsupported tensor type: tensor 'token_embd.weight' is I32"):
        GGUFCheckpoint(path)
    # A type id the gguf package does not know (a llama.cpp fork's): patch the first tensor's.
    data = bytearray(small_gguf.read_bytes())
    reader = gguf.GGUFReader(small_gguf)
    t = reader.tensors[0]
    type_at = t.field.offset + sum(p.nbytes for p in t.field.parts[:4])
    assert struct.unpack_from("<I", data, type_at)[0] == int(t.tensor_type)
    struct.pack_into("<I", data, type_at, 147)
    bad = tmp_path / "fork.gguf"
    bad.write_bytes(bytes(data))
    assert_clean_error(run_cli("convert", bad, tmp_path / "o"), str(bad), "unsupported tensor type",
                       repr(t.name), "GGML type 147")


def test_missing_tokenizer_metadata(tmp_path, f16, tokenizer_dir):
    hf = f16["qwen3_moe"][0]
    (path,), _ = write_gguf(hf, None, tmp_path / "notok.gguf", "F16")
    assert_clean_error(run_cli("convert", path, tmp_path / "o"), str(path), "missing tokenizer metadata",
                       "tokenizer.ggml.model")


def test_split_set_with_a_missing_part_cli(tmp_path, f16, tokenizer_dir):
    hf = f16["olmoe"][0]
    parts, _ = write_gguf(hf, tokenizer_dir, tmp_path / "s.gguf", "F16", split_max_tensors=20)
    parts[-1].unlink()
    assert_clean_error(run_cli("convert", parts[0], tmp_path / "o"), str(parts[0]), parts[-1].name, "missing")


def test_running_a_gguf_directly_says_convert_first(small_gguf):
    with pytest.raises(ModelLoadError, match="a GGUF file; convert it first: edgemoe convert"):
        edgemoe.load(small_gguf)
