"""Convert a Hugging Face checkpoint to GGUF with the converter script that the peers'
environment installed (llama.cpp's convert_hf_to_gguf.py), run unmodified.

    python gguf_convert.py CONVERTER.py HF_DIR OUT.gguf OUTTYPE

Three things are adapted at run time, without touching the converter's code. Its config
reader is wrapped so that a transformers 5 config, which nests the RoPE base under
`rope_parameters`, also offers it as the top-level `rope_theta` the converter reads
(otherwise the GGUF silently gets llama.cpp's default base of 10000). And the converter
identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a test
string, and refuses tokenizers it has no hash for, such as one trained locally. Before
calling the converter's main() this script wraps that lookup, at run time: when the
converter does not recognise the tokenizer, the pre-tokenizer is named from the
tokenizer's own declaration in tokenizer.json (a byte-level pre-tokenizer with the GPT-2
split regex is llama.cpp's "gpt-2"). Anything else is refused with a clear message. The
benchmark feeds token ids to every engine, so the GGUF vocabulary only has to load; for
the same reason a converter that reads only a SentencePiece tokenizer.model (ERNIE-4.5)
is given the tokenizer.json BPE vocabulary when the checkpoint has no tokenizer.model.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import re
import sys
from pathlib import Path


def declared_pre_tokenizer(hf_dir: Path) -> str:
    t = json.loads((hf_dir / "tokenizer.json").read_text())
    pre = t.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not t.get("normalizer"):
        return "gpt-2"
    raise SystemExit(f"{hf_dir / 'tokenizer.json'}: the GGUF converter does not know this tokenizer and its "
                     f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent that this script can name")


def add_missing_enum_members(converter: str) -> list[str]:
    """The converter shipped with a llama.cpp fork may name enum members that its own copy
    of gguf-py has and the `gguf` package lacks (ik_llama.cpp's Q6_0 type). Such names are
    only used for output types this benchmark never asks for, so each missing one is added
    as a placeholder with an unused value; existing members keep their values."""
    import gguf

    src = Path(converter).read_text()
    wanted: dict[str, set[str]] = {}
    for cls_name, member in re.findall(r"gguf\.([A-Za-z_]+)\.([A-Z][A-Z0-9_]*)\b", src):
        cls = getattr(gguf, cls_name, None)
        if isinstance(cls, type) and issubclass(cls, enum.IntEnum) and member not in cls.__members__:
            wanted.setdefault(cls_name, set()).add(member)
    added = []
    for cls_name, members in wanted.items():
        old = getattr(gguf, cls_name)
        values = {m.name: int(m.value) for m in old}
        free = max(values.values(), default=0) + 1000
        for i, name in enumerate(sorted(members)):
            values[name] = free + i
            added.append(f"{cls_name}.{name}")
        setattr(gguf, cls_name, enum.IntEnum(cls_name, values))
    return added


def bpe_without_sentencepiece(mod, hf_dir: Path) -> list[str]:
    """Converter classes whose set_vocab reads only a SentencePiece tokenizer.model
    (ERNIE-4.5) get the tokenizer.json BPE vocabulary instead when `hf_dir` has no
    tokenizer.model; returns the names of the classes wrapped."""
    wrapped = []
    for cls in [c for c in vars(mod).values() if isinstance(c, type) and "set_vocab" in vars(c)]:
        original = cls.set_vocab
        if "_set_vocab_sentencepiece" not in original.__code__.co_names:
            continue

        def set_vocab(self, _original=original):
            if (hf_dir / "tokenizer.model").exists() or not (hf_dir / "tokenizer.json").exists():
                return _original(self)
            print("gguf_convert: no tokenizer.model; writing the tokenizer.json BPE vocabulary", file=sys.stderr)
            return self._set_vocab_gpt2()

        cls.set_vocab = set_vocab
        wrapped.append(cls.__name__)
    return wrapped


def main(argv: list[str]) -> int:
    converter, hf_dir, out, outtype = argv
    hf_dir = Path(hf_dir)
    added = add_missing_enum_members(converter)
    if added:
        print(f"gguf_convert: placeholders for names the gguf package lacks: {', '.join(added)}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = mod
    spec.loader.exec_module(mod)  # defines the model classes; its main() runs only as __main__

    for cls in [c for c in vars(mod).values() if isinstance(c, type) and "load_hparams" in vars(c)]:
        original_load = cls.load_hparams

        def load_hparams(dir_model, _original=original_load):
            hp = _original(dir_model)
            rope = hp.get("rope_parameters") or {}
            if "rope_theta" not in hp and "rope_theta" in rope:
                hp["rope_theta"] = rope["rope_theta"]
            return hp

        cls.load_hparams = staticmethod(load_hparams)

    owners = [c for c in vars(mod).values() if isinstance(c, type) and "get_vocab_base_pre" in vars(c)]
    if not owners:
        raise SystemExit(f"{converter}: no get_vocab_base_pre() to wrap; this converter version is not supported")
    for cls in owners:
        original = cls.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer, _original=original):
            try:
                return _original(self, tokenizer)
            except NotImplementedError:
                name = declared_pre_tokenizer(hf_dir)
                print(f"gguf_convert: pre-tokenizer not in the converter's table; using {name!r} as "
                      f"declared by {hf_dir / 'tokenizer.json'}", file=sys.stderr)
                return name

        cls.get_vocab_base_pre = get_vocab_base_pre
    bpe_without_sentencepiece(mod, hf_dir)
    sys.argv = [converter, str(hf_dir), "--outfile", out, "--outtype", outtype]
    mod.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
