"""Per-token cost of constrained JSON decoding on the CPU: llguidance, xgrammar,
outlines-core and lm-format-enforcer, on the tokenizers edgemoe supports.

Which library `response_format` uses is chosen from this measurement
(edgemoe_lab/results/grammar_overhead.md). Each library drives the same loop a server step
runs: compute the allowed-token mask, apply it to the logits, sample, advance the matcher.
Every library writes the same fixed valid JSON document, then EOS (see `measure`), and is
asked for the same compact JSON (", " and ": ", no other whitespace), so each does the same
work; the cost timed per token is the grammar's alone: the mask, applying it to random
logits, and advancing the matcher. The decode step of the bundled
model is timed in the same run as the baseline it adds to.

Tokenizers: the bundled model's (byte-level BPE, 4,096 tokens), and two 32,000-token
tokenizers trained here on the Python standard library, one byte-level BPE (Qwen, OLMoE
style) and one Metaspace BPE with byte fallback (Mixtral/Llama style).

Run (the libraries are not edgemoe dependencies except the chosen one):
    python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install torch==2.13.0
    /tmp/gvenv/bin/pip install tokenizers numpy safetensors jinja2 transformers \
        llguidance outlines-core lm-format-enforcer xgrammar
    PYTHONPATH=. /tmp/gvenv/bin/python -m edgemoe_lab.experiments.grammar_overhead --out edgemoe_lab/results/grammar_overhead
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from edgemoe_lab.peer.machine import cpu_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
RUNS = 20  # passes over each document

DECISION = """Choice: **llguidance**. On every tokenizer its cost per token is within a fraction of a
millisecond of xgrammar's (both far below a decode step of any real model); it reads the
vocabulary straight from tokenizer.json (byte-level BPE and Metaspace/byte-fallback alike,
no transformers at run time) and has no Python dependencies, where xgrammar needs torch,
transformers, triton and pydantic; it compiles any JSON object (json_object) and Lark
grammars with special-token terminals (tool calls), which outlines-core's regular
expressions cannot (no unbounded nesting); lm-format-enforcer is pure Python and 10-100x
slower per token, and its transformers integration no longer imports with transformers 5.
llguidance forces the tokenizer's canonical spelling of text the grammar fixes (keys,
enum values), which keeps the model on token sequences it was trained on."""


def corpus(limit_bytes: int = 12_000_000):
    """Text of the Python standard library's sources (files that are valid UTF-8)."""
    total = 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total > limit_bytes:
            break


def train_byte_level(out: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return save_hf(tok, out, "<|endoftext|>")


def train_metaspace(out: Path, vocab: int) -> Path:
    """Llama/Mixtral layout: Metaspace pre-tokenizer, BPE with <0xXX> byte-fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # Pieces of at most 16 characters, as SentencePiece makes them (its max_piece_length).
    trainer = trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  max_token_length=16)
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    old = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    new = {t: i for i, (t, _) in enumerate(old[:3])}
    for b in byte_tokens:
        new[b] = len(new)
    for t, _ in old[3:]:
        new.setdefault(t, len(new))
    data["model"]["vocab"] = new
    data["model"]["byte_fallback"] = True
    for a in data["added_tokens"]:
        a["id"] = new[a["content"]]
    tok = Tokenizer.from_str(json.dumps(data))
    return save_hf(tok, out, "</s>")


def save_hf(tok, out: Path, eos: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos}))
    return out


class Case:
    """One library on one tokenizer: setup() once, then new_matcher() per sequence."""

    def __init__(self, tok_dir: Path, schema: dict | None):
        from transformers import PreTrainedTokenizerFast

        self.dir, self.schema = tok_dir, schema
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                          eos_token=json.loads((tok_dir / "tokenizer_config.json").read_text())["eos_token"])
        self.vocab = len(self.hf)
        self.eos = self.hf.eos_token_id


class LLGuidance(Case):
    """Through edgemoe.grammar, exactly as the server runs it."""

    name = "llguidance"

    def setup(self):
        from edgemoe.grammar import Grammar, GrammarTokenizer, json_schema_grammar
        from edgemoe.tokenizer import Tokenizer

        tok = Tokenizer(self.dir, eos_token_ids=[self.eos])
        self.grammar = Grammar(GrammarTokenizer(tok, self.vocab), json_schema_grammar(self.schema))

    def new_matcher(self):
        return self.grammar.processor()

    def step(self, m, logits):
        m.ids = getattr(m, "ids", [0])  # a one-token prompt; the processor reads sampled tokens from the context
        logits.copy_(m(m.ids, logits))

    def advance(self, m, token) -> bool:
        m.ids.append(token)
        assert m.matcher.consume_token(token)  # consumed here (not at the next call) to see whether it stopped
        m.seen = len(m.ids)
        return m.matcher.is_stopped()


class XGrammar(Case):
    name = "xgrammar"

    def setup(self):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=self.vocab)
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        # Compact JSON, as edgemoe asks of llguidance (grammar.JSON_OPTIONS).
        schema = self.schema if self.schema is not None else {"type": "object"}
        self.compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        self.mask = xgr.allocate_token_bitmask(1, self.vocab)

    def new_matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def step(self, m, logits):
        m.fill_next_token_bitmask(self.mask)
        self.xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.mask)

    def advance(self, m, token) -> bool:
        assert m.accept_token(token)
        return m.is_terminated()


class OutlinesCore(Case):
    name = "outlines-core"

    def setup(self):
        import outlines_core as oc

        if self.schema is None:
            raise NotImplementedError("regular expressions only: no grammar for any JSON object (unbounded nesting)")
        vocab: dict[bytes, list[int]] = {}
        for i in range(self.vocab):
            if i == self.eos:
                continue
            vocab.setdefault(token_bytes(self.hf, i), []).append(i)
        self.vocabulary = oc.Vocabulary(self.eos, vocab)
        regex = oc.json_schema.build_regex_from_schema(json.dumps(self.schema), whitespace_pattern=" ?")
        self.index = oc.Index(regex, self.vocabulary)
        self.oc = oc
        self.mask = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)

    def new_matcher(self):
        return self.oc.Guide(self.index)

    def step(self, m, logits):
        self.mask.zero_()
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        bits = ((self.mask.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[: logits.shape[-1]]
        logits.masked_fill_(bits == 0, float("-inf"))

    def advance(self, m, token) -> bool:
        if token == self.eos:  # allowed by the mask at the end; outlines-core has no transition for it
            return True
        m.advance(token)
        return m.is_finished()


class FormatEnforcer(Case):
    name = "lm-format-enforcer"

    def setup(self):
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

        # Its transformers integration imports transformers.tokenization_utils, which transformers 5
        # removed; the same vocabulary table is built here (token string, starts a word).
        special = set(self.hf.all_special_ids)
        zero = self.hf.encode("0", add_special_tokens=False)[-1]
        regular = []
        for i in range(self.vocab):
            if i in special:
                continue
            after_zero = self.hf.decode([zero, i])[1:]
            regular.append((i, after_zero, len(after_zero) > len(self.hf.decode([i]))))
        decode = lambda ids: self.hf.decode(ids).rstrip("\ufffd")  # noqa: E731
        self.data = TokenEnforcerTokenizerData(regular, decode, self.eos, False, self.vocab)
        self.make = lambda: TokenEnforcer(self.data, JsonSchemaParser(self.schema))

    def new_matcher(self):
        return [self.make(), []]

    def step(self, m, logits):
        allowed = m[0].get_allowed_tokens(m[1]).allowed_tokens
        keep = torch.full_like(logits, float("-inf"))
        keep[torch.tensor(allowed)] = 0
        logits.add_(keep)

    def advance(self, m, token) -> bool:
        m[1].append(token)
        return token == self.eos


def token_bytes(hf, i: int) -> bytes:
    """The raw bytes one token stands for (byte-level and byte-fallback vocabularies)."""
    piece = hf.convert_ids_to_tokens(i)
    if piece.startswith("<0x") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    if "▁" in piece or not all(c in BYTE_DECODER for c in piece):
        return piece.replace("▁", " ").encode()
    return bytes(BYTE_DECODER[c] for c in piece)


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()


DOCS = {
    "json_schema": json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry", "engines"],
                               "active": True}),
    "json_object": json.dumps({"user": {"name": "Ada", "langs": ["en", "fr"], "score": 9.5, "ok": True, "meta": None},
                               "items": [1, 2, {"k": "v", "deep": [[1], [2, 3]]}], "note": "compact JSON text"}),
}


_TABLES: dict = {}


def byte_table(hf, vocab: int) -> tuple[dict[bytes, list[int]], int]:
    """Ids of every (non-special) token by the bytes it spells, and the longest spelling."""
    if id(hf) not in _TABLES:
        special = set(hf.all_special_ids)
        table: dict[bytes, list[int]] = {}
        for i in range(vocab):
            if i not in special:
                table.setdefault(token_bytes(hf, i), []).append(i)
        _TABLES[id(hf)] = (table, max(len(b) for b in table))
    return _TABLES[id(hf)]


def measure(case: Case, fmt: str) -> dict:
    """Every library writes the same fixed valid document: at each step, of the tokens its
    mask allows, the longest one that spells the document's next bytes is taken (so a
    library that insists on the tokenizer's canonical spelling of forced text, as
    llguidance does, gets it), then EOS. Timed per token: the mask, applying it to random
    logits, and advancing the matcher; choosing the token is not timed."""
    t0 = time.perf_counter()
    case.setup()
    setup_s = time.perf_counter() - t0
    table, longest = byte_table(case.hf, case.vocab)
    data = DOCS[fmt].encode()
    gen = torch.Generator().manual_seed(0)
    per_token, count = [], 0
    for _ in range(RUNS):
        m = case.new_matcher()
        pos, done, count = 0, False, 0
        while not done:
            logits = torch.randn(case.vocab, generator=gen)
            t = time.perf_counter()
            case.step(m, logits)
            spent = time.perf_counter() - t
            if pos == len(data):
                token = case.eos
                done = True
            else:
                token = next((i for n in range(min(longest, len(data) - pos), 0, -1)
                              for i in table.get(data[pos : pos + n], ()) if torch.isfinite(logits[i])), None)
                if token is None:
                    raise RuntimeError(f"the mask allows no token for the document's bytes at {pos}")
                pos += len(token_bytes(case.hf, token))
            if not torch.isfinite(logits[token]):
                raise RuntimeError("the mask does not allow EOS after the complete document")
            t = time.perf_counter()
            case.advance(m, token)
            per_token.append(spent + time.perf_counter() - t)
            count += 1
    per_token.sort()
    return {"setup_s": setup_s, "tokens": count, "mean_ms": 1e3 * statistics.fmean(per_token),
            "p50_ms": 1e3 * per_token[len(per_token) // 2], "p99_ms": 1e3 * per_token[int(len(per_token) * 0.99)]}


def baseline_decode_ms() -> float:
    """One decode step of the bundled model (the cost a grammar adds to)."""
    import edgemoe

    engine = edgemoe.load()
    r = engine.generate("def f(x):", max_tokens=64, ignore_eos=True, temperature=0)
    return 1e3 * r.stats.decode_s / (r.stats.generated_tokens - 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="edgemoe_lab/results/grammar_overhead")
    p.add_argument("--libs", default="llguidance,xgrammar,outlines-core,lm-format-enforcer")
    p.add_argument("--work", help="folder for the trained tokenizers (reused when present)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    libs = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore, FormatEnforcer)}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="grammar-bench-"))
    import edgemoe.api

    toks = {"bundled (byte-level BPE, 4096)": edgemoe.api.default_model_dir()}
    t = time.perf_counter()
    for name, sub, train in (("byte-level BPE, 32000", "bl32k", train_byte_level),
                             ("Metaspace BPE + byte fallback, 32000", "ms32k", train_metaspace)):
        done = (work / sub / "tokenizer.json").exists()
        toks[name] = work / sub if done else train(work / sub, 32000)
    print(f"trained tokenizers in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    base = baseline_decode_ms()
    rows = []
    for tok_name, tok_dir in toks.items():
        for fmt, schema in (("json_schema", SCHEMA), ("json_object", None)):
            for name in args.libs.split(","):
                case = libs[name](tok_dir, schema)
                try:
                    row = measure(case, fmt)
                except NotImplementedError as e:
                    row = {"error": str(e)}
                except Exception as e:  # a library that fails on a tokenizer is a result too
                    row = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                row.update(library=name, tokenizer=tok_name, format=fmt)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    import importlib.metadata as md

    dist = {"outlines-core": "outlines_core"}
    versions = {n: md.version(dist.get(n, n)) for n in libs}
    requires = {n: sorted({re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in md.requires(dist.get(n, n)) or []
                           if "extra ==" not in r}) for n in libs}
    result = {"baseline_decode_ms": base, "versions": versions, "requires": requires, "rows": rows, "cpu": cpu_model(),
              "threads": 1, "runs": RUNS, "documents": DOCS, "command": "python -m edgemoe_lab.experiments.grammar_overhead " +
              " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    lines = ["# Constrained JSON decoding: per-token overhead on CPU\n",
             f"CPU: {cpu_model()}, 1 thread. Bundled model decode step in the same run: {base:.2f} ms/token "
             "(the % column is the grammar's time per token relative to it; a real MoE's step is 10-1000x "
             "longer). Other engineers' jobs shared the 2 cores, so compare rows, not absolute numbers.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
             "Run-time requirements: " + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in requires.items()) + ".",
             "", DECISION, "",
             "| tokenizer | format | library | setup s | mean ms/token | % of decode | p50 | p99 | tokens | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokenizer']} | {r['format']} | {r['library']} | | | | | | | {r['error']} |")
        else:
            lines.append(f"| {r['tokenizer']} | {r['format']} | {r['library']} | {r['setup_s']:.2f} | {r['mean_ms']:.3f} | "
                         f"{100 * r['mean_ms'] / base:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['tokens']} | |")
    lines += ["", "Command (the libraries in their own environment, see the docstring of edgemoe_lab/experiments/grammar_overhead.py):",
              "", "```", f"PYTHONPATH=. {result['command']}", "```"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
