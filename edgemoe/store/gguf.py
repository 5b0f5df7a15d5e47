"""Reading a GGUF file (llama.cpp, Ollama, LM Studio) as a source for `edgemoe convert`.

`GGUFCheckpoint` offers what the converter uses of `checkpoint.HFCheckpoint` (`config`,
`family`, `args`, `tensors()`, `build()`) plus what only a GGUF needs: the files a
Hugging Face directory would carry (config.json, tokenizer.json, tokenizer_config.json)
built from the metadata, a default expert plan that keeps the file's precision, and a
report of the error that re-quantizing adds. Its tensors come out under edgemoe's own
names; what each llama.cpp architecture means (family, config keys, tensor names) is in
gguf_archs.py, its RoPE settings in gguf_rope.py.

The file is parsed by the `gguf` package (maintained with llama.cpp); tensor data is read
with pread, one expert at a time, and dequantized by `gguf.quants`. Nothing in a GGUF is
code: the chat template is Jinja, rendered in a sandbox by edgemoe/tokenizer.py.

What is kept of the source's quantization: relative RMS error added on top of the GGUF's
own dequantized weights, measured on Gaussian weights with 1 % outlier columns (the worse
case: edgemoe_lab/results/gguf_kquants.md for Q4_K and Q6_K); every conversion reports the
value it measured on the real weights:

    GGUF expert type               edgemoe format   bits/weight     added error
    F32 / F16 / BF16               --dtype float    32 / 16         0 / bf16 rounding (0.2 %)
    Q8_0 (32-blocks, fp16 scale)   int8             8.5 -> 8.0      0.7-1.6 %
    Q4_0 (32-blocks, 16 levels)    int4-asym        4.5 -> 4.5      7-9 % (Q4_0's own: ~10 %)
    Q4_1, Q5_0, Q5_1, Q5_K, Q6_K   int8             5-6.6 -> 8.0    0.7-3 % (Q6_K: 3.0 %)
    Q4_K, IQ3_*, IQ4_*             int4-asym        4.5 -> 4.5      7-9.4 % (Q4_K: 9.4 %, its own 8.9 %)
    Q2_K, Q3_K, IQ2_*, IQ1_*, TQ*  int3-asym, int4-asym, int2-asym (a level above the source's bits)
    MXFP4 (gpt-oss)                mxfp4            4.25 -> 4.25    0: the codes are kept bit for bit

int4-asym rather than int4 for Q4_0: 9 % instead of 15 % added, at Q4_0's own 4.5 bits.
K-quants are re-quantized rather than kept as raw blocks: computing from the blocks needs
a SIMD kernel per type to be usable (a torch dequantizer is 65-75x slower than the int4
kernel per expert); `--format int8` keeps Q4_K within 3 % at 8 bits per weight.

None of these is lossless: our int8 has one scale per output row (Q8_0 one per 32
weights) and our 4-bit groups are 64 weights wide (Q4_0's blocks 32, with an integer grid
where ours is half-integer), so a GGUF block's values never fall exactly on our grid.
`--bits 16` keeps any source to within bf16 rounding.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import torch

from ..errors import ModelLoadError
from ..models import get_family
from ..models.base import BaseModelArgs, Transformer
from .names import GGUF_MAGIC
from .gguf_archs import ARCHITECTURES, BLOCK, NOT_MAPPED, Arch, Ctx, Meta, canonical_name
from .gguf_archs import LEGACY_EXPERT as _LEGACY_EXPERT
from .gguf_archs import STACKED_EXPERTS as _STACKED_EXPERTS
from .gguf_rope import rope_parameters

SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# A metadata array longer than this is corruption (vocabularies and merge lists are < 1M).
MAX_ARRAY = 1 << 26

_ROUTER = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight$")

# Default expert format per GGUF type (see the module docstring): at least the source's
# bits per weight, one level up below 4 bits.
_EXPERT_FORMAT = {
    "Q8_0": "int8", "Q8_1": "int8", "Q8_K": "int8",
    "Q4_0": "int4-asym", "Q4_K": "int4-asym", "IQ4_NL": "int4-asym", "IQ4_XS": "int4-asym",
    "IQ3_XXS": "int4-asym", "IQ3_S": "int4-asym", "Q3_K": "int4-asym",
    "Q4_1": "int8", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "MXFP4": "int8",  # mixed with others
    "Q2_K": "int3-asym", "IQ2_XXS": "int3-asym", "IQ2_XS": "int3-asym", "IQ2_S": "int3-asym",
    "IQ1_S": "int2-asym", "IQ1_M": "int2-asym", "TQ1_0": "int2-asym", "TQ2_0": "int2-asym",
}
# Larger = more bits; a mixed expert (Q4_K_M: gate/up Q4_K, down Q6_K) takes the largest.
_FORMAT_RANK = {"int2-asym": 0, "int3-asym": 1, "int4-asym": 2, "int8": 3}
_FLOAT_TYPES = ("F32", "F16", "BF16")

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with before BPE (llama-vocab.cpp,
# in their tokenizer.json form), applied one after the other; None: GPT-2's, built into
# ByteLevel.
_GPT2_SPLIT = None
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+",)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",)
# gpt-oss (o200k), Llama 4, MiniMax-M2.
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
# DeepSeek-V3 / R1: digits in threes, then kana and CJK runs, then words and punctuation.
_DEEPSEEK3_SPLIT = (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Granite 3 (refact), StarCoder: digits one by one, then GPT-2's rule.
_STARCODER_SPLIT = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT, "olmo": _GPT2_SPLIT, "exaone4": _GPT2_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT, "hunyuan": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "glm4": _LLAMA3_SPLIT, "chatglm-bpe": _LLAMA3_SPLIT,
    "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT, "minimax-m2": _GPT4O_SPLIT,
    "deepseek-v3": _DEEPSEEK3_SPLIT, "refact": _STARCODER_SPLIT, "starcoder": _STARCODER_SPLIT,
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"}  # as llama.cpp: whole words first

# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------- parsing


def _gguf():
    try:
        import gguf
    except ImportError:  # a dependency of edgemoe; only a broken install lacks it
        raise ModelLoadError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


class _PastEnd(Exception):
    pass


def _reader_class():
    """gguf.GGUFReader made safe for damaged files: every read must lie inside the file
    (the package would silently return short arrays and loop on a corrupt count), and
    arrays are bounded before their elements are walked one by one."""
    gguf = _gguf()

    class SafeReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if int(offset) < 0 or end > self.data.size:
                raise _PastEnd(f"a read of {end - int(offset)} bytes at offset {int(offset)} runs past the end "
                               f"of the file ({self.data.size} bytes)")
            return super()._get(offset, dtype, count, *args, **kwargs)

        def _get_field_parts(self, orig_offs, raw_type, *args, **kwargs):
            if int(raw_type) == int(gguf.GGUFValueType.ARRAY):
                n = int(self._get(int(orig_offs) + 4, np.uint64)[0])
                if n > MAX_ARRAY or int(orig_offs) + 12 + n > self.data.size:
                    raise _PastEnd(f"a metadata array at offset {int(orig_offs)} claims {n} elements, "
                                   "more than the file holds")
            return super()._get_field_parts(orig_offs, raw_type, *args, **kwargs)

        def _build_tensors(self, start_offs, fields, *args, **kwargs):
            known = {int(t) for t in gguf.GGMLQuantizationType}
            for field in fields:
                code = int(field.parts[4][0])
                if code not in known:
                    name = bytes(field.parts[1]).decode("utf-8", "replace")
                    raise _UnknownType(f"tensor {name!r} has GGML type {code}, which the gguf package does not know "
                                       "(a type of a llama.cpp fork or a newer version?)")
            return super()._build_tensors(start_offs, fields, *args, **kwargs)

    return SafeReader


class _UnknownType(Exception):
    pass


@dataclass
class GGUFTensor:
    name: str
    file: Path
    type_name: str  # GGMLQuantizationType name, e.g. "Q4_K"
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (outermost first), e.g. (E, I, H)
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _open_one(path: Path):
    """Parse one GGUF file's header; returns the reader."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return _reader_class()(str(path), "r")
    except _UnknownType as e:
        raise ModelLoadError(f"{path}: unsupported tensor type: {e}") from None
    except _PastEnd as e:
        raise ModelLoadError(f"{path}: truncated or corrupted GGUF: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise ModelLoadError(f"{path}: corrupted GGUF: {' '.join(str(e).split()) or type(e).__name__}") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None


def _metadata(reader, path: Path) -> dict:
    gguf = _gguf()
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise ModelLoadError(f"{path}: corrupted GGUF: metadata key {key!r} cannot be read ({e})") from None
        if field.types == [gguf.GGUFValueType.FLOAT32] and isinstance(value, float):
            value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        meta[key] = value
    return meta


def split_parts(path: Path) -> list[Path]:
    """All files of the split set `path` belongs to (just [path] if it is not split),
    in order; a clear error if one is missing."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count, no = int(m["count"]), int(m["no"])
    if not 1 <= no <= count:
        raise ModelLoadError(f"{path}: split part number {no} is outside 1..{count}")
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{path}: part of a {count}-part split GGUF, but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    return parts


# ----------------------------------------------------------------------------- the checkpoint


class GGUFCheckpoint:
    """A validated GGUF file (or split set) seen as a checkpoint: its config from the
    metadata, its tensors under edgemoe's names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(f"{self.path}: file does not exist")
        self.files = split_parts(self.path)
        readers = [_open_one(f) for f in self.files]
        self.meta = _metadata(readers[0], self.files[0])
        self._check_split(readers)
        self.tensor_map: dict[str, GGUFTensor] = {}
        for f, r in zip(self.files, readers):
            size = f.stat().st_size
            for t in r.tensors:
                if t.name in self.tensor_map:
                    raise ModelLoadError(f"{f}: tensor {t.name!r} appears twice in the split set")
                if t.data_offset + t.n_bytes > size:
                    raise ModelLoadError(f"{f}: truncated GGUF: tensor {t.name!r} ends past the end of the file")
                self.tensor_map[t.name] = GGUFTensor(
                    t.name, f, t.tensor_type.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                    int(t.data_offset), int(t.n_bytes))
        del readers  # drop the memory maps; data is read with pread
        self.arch_name = self.meta.get("general.architecture")
        if not isinstance(self.arch_name, str):
            raise ModelLoadError(f"{self.path}: metadata general.architecture is missing; not a model GGUF?")
        if self.arch_name in NOT_MAPPED:
            raise ModelLoadError(
                f"{self.path}: GGUF architecture {self.arch_name!r} ({NOT_MAPPED[self.arch_name]}) is not supported "
                "yet; edgemoe runs this family from its Hugging Face checkpoint: edgemoe convert HF_DIR OUT_DIR")
        if self.arch_name not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: unsupported GGUF architecture {self.arch_name!r} (supported: "
                + ", ".join(f"{a} ({d.description})" for a, d in sorted(ARCHITECTURES.items())) + ")")
        self.arch: Arch = ARCHITECTURES[self.arch_name]
        self._check_types()
        self.config = self._config()
        src = f"{self.path} (config from its GGUF metadata)"
        self.family: ModuleType = get_family(self.config["model_type"], src)
        self.args: BaseModelArgs = self.family.ModelArgs.from_dict(self.config, src)
        self._check_layout()
        self.expert_parts = self._expert_parts()
        self._plan_rows: dict[tuple, list[float]] = {}  # added-error accounting, see observe_expert
        self._types: dict | None = None
        self.source_bytes = sum(t.nbytes for t in self.tensor_map.values())
        self.tokenizer_files = build_tokenizer_files(self.meta, self.path)

    # -- validation

    def _check_split(self, readers) -> None:
        count = self.meta.get("split.count")
        if len(self.files) == 1:
            if isinstance(count, int) and count > 1:
                raise ModelLoadError(
                    f"{self.path}: part of a {count}-part split GGUF, but its name does not follow the "
                    f"MODEL-00001-of-{count:05d}.gguf pattern, so the other parts cannot be found")
            return
        for i, (f, r) in enumerate(zip(self.files, readers)):
            field = r.fields.get("split.no")
            no = field.contents() if field is not None else None
            if no != i:
                raise ModelLoadError(f"{f}: metadata split.no is {no!r}, expected {i} from the file name")
            field = r.fields.get("split.count")
            n = field.contents() if field is not None else None
            if n != len(self.files):
                raise ModelLoadError(f"{f}: metadata split.count is {n!r}, expected {len(self.files)} from the file name")
        total = self.meta.get("split.tensors.count")
        found = sum(len(r.tensors) for r in readers)
        if isinstance(total, int) and total != found:
            raise ModelLoadError(f"{self.files[0]}: the split set should hold {total} tensors, its parts hold {found}")

    def _check_types(self) -> None:
        """Every tensor type must be one the gguf package can dequantize."""
        gguf = _gguf()
        ok: dict[str, bool] = {}
        for t in self.tensor_map.values():
            if t.type_name not in ok:
                block, size = gguf.GGML_QUANT_SIZES[t.qtype]
                try:
                    gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), t.qtype)
                    ok[t.type_name] = t.type_name not in ("I8", "I16", "I32", "I64", "F64")
                except (NotImplementedError, ValueError, TypeError):
                    ok[t.type_name] = False
            if not ok[t.type_name]:
                raise ModelLoadError(f"{t.file}: unsupported tensor type: tensor {t.name!r} is {t.type_name}, which "
                                     "edgemoe cannot dequantize (the gguf package has no dequantizer for it)")

    def _check_layout(self) -> None:
        """The tensors must be those the config describes: routers exactly in the config's
        MoE layers, and every tensor one edgemoe knows (names are checked again, with
        shapes, when the resident weights are loaded)."""
        for name, t in self.tensor_map.items():
            if _STACKED_EXPERTS.match(name) or _LEGACY_EXPERT.match(name) or self._skipped(name):
                continue
            try:
                canonical_name(self.arch, name)
            except KeyError:
                raise ModelLoadError(f"{t.file}: tensor {name!r} is not used by edgemoe's {self.config['model_type']} "
                                     f"(unexpected in a GGUF of architecture {self.arch_name})") from None
        routed = sorted(self._moe_layers)
        if routed != self.args.moe_layers():
            raise ModelLoadError(f"{self.path}: the config built from the metadata makes layers "
                                 f"{self.args.moe_layers()} MoE, but the routers are in layers {routed}")

    def _skipped(self, name: str) -> bool:
        """Tensors of multi-token-prediction blocks past the decoder (GLM-4.5's nextn)."""
        m = BLOCK.match(name)
        return m is not None and int(m.group(1)) >= self._n_layers

    # -- config

    def _config(self) -> dict:
        shapes = {n: t.shape for n, t in self.tensor_map.items()}
        m = Meta(self.meta, self.path, self.arch_name)
        c = Ctx(self.path, self.arch_name, m, shapes,
                read=lambda name: self._read(self.tensor_map[name]).float().numpy())
        blocks = m.need("block_count", int)
        nextn = m.get("nextn_predict_layers", int, 0) if self.arch.nextn else 0
        c.n_layers = self._n_layers = blocks - nextn
        if not 0 < c.n_layers <= 1024 or nextn < 0:
            raise ModelLoadError(f"{self.path}: metadata {self.arch_name}.block_count is {blocks}"
                                 + (f" with {nextn} prediction layers" if nextn else "") + ", outside 1..1024")
        heads = m.one("attention.head_count")
        if heads is None:
            raise ModelLoadError(f"{self.path}: metadata {self.arch_name}.attention.head_count is missing")
        if self.arch.kv_per_layer and isinstance(m.get("attention.head_count_kv", (int, list)), list):
            # Hybrids write 0 KV heads for their non-attention layers.
            c.kv_per_layer = m.get("attention.head_count_kv", list)
            if len(c.kv_per_layer) < c.n_layers or not all(isinstance(k, int) and k >= 0 for k in c.kv_per_layer) \
                    or len({k for k in c.kv_per_layer if k}) > 1:
                raise ModelLoadError(f"{self.path}: metadata {self.arch_name}.attention.head_count_kv "
                                     f"{str(c.kv_per_layer)[:60]} should give each layer 0 or one shared count")
            kv_heads = max(c.kv_per_layer) or heads
        else:
            kv_heads = m.one("attention.head_count_kv", int, heads)
        hidden = m.need("embedding_length", int)
        emb = self.tensor_map.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2:
            raise ModelLoadError(f"{self.path}: tensor token_embd.weight is missing or not 2-D")
        if heads <= 0 or hidden <= 0:
            raise ModelLoadError(f"{self.path}: metadata head_count {heads} and embedding_length {hidden} "
                                 "must be positive")
        key_len, value_len = m.get("attention.key_length", int), m.get("attention.value_length", int)
        c.head_dim = key_len if key_len is not None else hidden // heads
        c.experts, c.used = m.get("expert_count", int, 0), m.get("expert_used_count", int, 0)
        c.moe_layers = self._moe_layers = sorted(
            {int(x.group(1)) for n in self.tensor_map if (x := _ROUTER.match(n)) and int(x.group(1)) < c.n_layers})
        if c.experts <= 0 or not c.moe_layers:
            raise ModelLoadError(f"{self.path}: a dense {self.arch_name} model ({self.arch_name}.expert_count "
                                 f"{c.experts}, no blk.N.ffn_gate_inp router); edgemoe runs Mixture-of-Experts models")
        c.expert_dim = m.get("expert_feed_forward_length", int) or self._expert_dim()
        cfg: dict = {
            "architectures": None,
            "vocab_size": emb.shape[0],
            "hidden_size": hidden,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": m.get("context_length", int, 4096),
            "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", float, 1e-6),
            "tie_word_embeddings": "output.weight" not in self.tensor_map,
        }
        if key_len is not None and self.arch_name != "deepseek2":  # MLA's lengths are its own (see there)
            if value_len is not None and key_len != value_len:
                raise ModelLoadError(f"{self.path}: attention key_length {key_len} != value_length {value_len} "
                                     "is not supported")
            cfg["head_dim"] = key_len
        elif m.get("rope.dimension_count", int) not in (None, hidden // heads) and self.arch_name in ("llama",):
            cfg["head_dim"] = c.head_dim = m.get("rope.dimension_count", int)
        freqs = self._read(self.tensor_map["rope_freqs.weight"]).numpy() if "rope_freqs.weight" in self.tensor_map \
            else None
        if freqs is not None and self.arch_name not in ("llama", "llama4"):
            raise ModelLoadError(f"{self.path}: rope frequency factors (rope_freqs.weight) are not supported for "
                                 f"{self.arch_name}")
        cfg["rope_parameters"] = rope_parameters(c, m.get("rope.freq_base", float, 10000.0), freqs)
        cfg["bos_token_id"] = self.meta.get("tokenizer.ggml.bos_token_id")
        eos = [self.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        self.arch.config(c, cfg)  # its None values are meant (q_lora_rank None: no q LoRA)
        cfg["torch_dtype"] = "float32" if self._all_f32() else "bfloat16"
        cfg["gguf"] = {"file": self.files[0].name, "architecture": self.arch_name,
                       "name": self.meta.get("general.name"), "file_type": self.meta.get("general.file_type")}
        return cfg

    def _expert_dim(self) -> int:
        for name, t in self.tensor_map.items():
            if (x := _STACKED_EXPERTS.match(name)) and x.group(3) == "weight" and len(t.shape) == 3:
                return t.shape[2] if x.group(2) == "down" else t.shape[1]
            if (x := _LEGACY_EXPERT.match(name)) and len(t.shape) == 2:
                return t.shape[1] if x.group(2) == "down" else t.shape[0]
        raise ModelLoadError(f"{self.path}: no expert tensors (blk.N.ffn_gate_exps.weight) found")

    def _all_f32(self) -> bool:
        return all(t.type_name == "F32" for t in self.tensor_map.values())

    # -- tensors

    def _raw(self, t: GGUFTensor, index: int | None = None) -> np.ndarray:
        """The bytes of tensor `t` (or of its slice `index` along the first axis)."""
        count = 1 if index is None else t.shape[0]
        nbytes = t.nbytes // count
        offset = t.offset + (0 if index is None else index * nbytes)
        try:
            with open(t.file, "rb") as f:
                raw = os.pread(f.fileno(), nbytes, offset)
        except OSError as e:
            raise ModelLoadError(f"{t.file}: cannot read tensor {t.name!r}: {e.strerror or e}") from None
        if len(raw) != nbytes:
            raise ModelLoadError(f"{t.file}: truncated GGUF: tensor {t.name!r} ends past the end of the file")
        return np.frombuffer(raw, dtype=np.uint8)

    def _read(self, t: GGUFTensor, index: int | None = None) -> torch.Tensor:
        """Tensor `t` (or its slice `index` along the first axis) dequantized to float32
        (F16 and F32 keep their dtype), in numpy order (for weights: (out, in))."""
        gguf = _gguf()
        shape = t.shape if index is None else t.shape[1:]
        data = self._raw(t, index)
        if t.type_name == "F32":
            return torch.from_numpy(data.view(np.float32).reshape(shape).copy())
        if t.type_name == "F16":
            return torch.from_numpy(data.view(np.float16).reshape(shape).copy())
        try:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t.qtype)
            out = gguf.quants.dequantize(data.reshape(byte_shape), t.qtype)
        except ValueError as e:
            raise ModelLoadError(f"{t.file}: tensor {t.name!r} ({t.type_name}, shape {shape}) cannot be "
                                 f"dequantized: {e}") from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _read_mxfp4(self, t: GGUFTensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's MXFP4 matrix as the codes and exponents edgemoe's mxfp4 format
        stores, bit for bit: ggml's blocks are (exponent, 16 bytes) with element j in the
        low nibble of byte j and element j + 16 in its high nibble; ours keep the
        exponents apart and pack elements 2i, 2i + 1 into byte i (low, high)."""
        out, k = t.shape[1:]
        g = k // 32
        raw = self._raw(t, index).reshape(out, g, 17)
        scales = raw[:, :, 0].copy()  # (out, G) E8M0
        qs = raw[:, :, 1:]  # (out, G, 16)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (out, G, 32) in element order
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (out, G, 16)
        return torch.from_numpy(np.ascontiguousarray(packed)), torch.from_numpy(scales)

    def _canonical_tensor(self, name: str, t: GGUFTensor) -> tuple[str, torch.Tensor] | None:
        """(edgemoe name, tensor) of a non-expert tensor; None for one not loaded."""
        if self._skipped(name):
            return None
        try:
            key = canonical_name(self.arch, name)
        except KeyError:
            raise ModelLoadError(f"{t.file}: tensor {name!r} is not used by edgemoe's {self.config['model_type']} "
                                 f"(unexpected in a GGUF of architecture {self.arch_name})") from None
        if key is None:
            return None
        w = self._read(t)
        if self.arch.permuted_qk and re.search(r"\.attn\.[qk]\.", key):
            # llama.cpp's converter interleaves the two RoPE halves of each q/k head for
            # its rotation; undo it to get transformers' rotate-half layout back.
            heads = self.args.num_attention_heads if ".attn.q." in key else self.args.num_key_value_heads
            w = unpermute_qk(w, heads, name, t.file)
        if key.endswith("shared_gate.weight") and w.dim() == 1:
            w = w.unsqueeze(0)  # stored as (H,), a Linear(H, 1) is (1, H)
        if key.endswith("attn.sinks") and w.dim() != 1:
            w = w.reshape(-1)
        if key.endswith("attn.conv_weight") and w.dim() == 2:
            w = w.unsqueeze(1)  # depthwise kernel: the converter drops the middle axis of (C, 1, L)
        if key.endswith(".A_log") and re.search(r"\.ssm_a(\.weight)?$", name):
            # The converter stores Mamba's A = -exp(A_log); the family reads A_log.
            if not bool((w < 0).all()):
                raise ModelLoadError(f"{t.file}: tensor {name!r} should hold Mamba's negative A = -exp(A_log)")
            w = torch.log(-w.float())
        if any(re.fullmatch(p, name) for p in self.arch.flat):
            w = w.reshape(-1)
        return key, w

    def _joined_kv_b(self, layer: int) -> torch.Tensor:
        """DeepSeek's kv_b (heads * (nope + v), kv_lora) from llama.cpp's split attn_k_b
        (heads, kv_lora, nope), stored transposed, and attn_v_b (heads, v, kv_lora)."""
        k_t, v_t = (self.tensor_map.get(f"blk.{layer}.attn_{x}_b.weight") for x in "kv")
        if k_t is None or v_t is None:
            missing = f"blk.{layer}.attn_kv_b.weight or blk.{layer}.attn_k_b.weight and attn_v_b.weight"
            raise ModelLoadError(f"{self.path}: tensor {missing} missing")
        k, v = self._read(k_t).float(), self._read(v_t).float()
        if k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0] or k.shape[1] != v.shape[2]:
            raise ModelLoadError(f"{k_t.file}: tensors {k_t.name} {tuple(k.shape)} and {v_t.name} {tuple(v.shape)} "
                                 "do not fit together (heads, kv_lora_rank, nope) / (heads, v, kv_lora_rank)")
        return torch.cat([k.transpose(1, 2), v], dim=1).reshape(-1, k.shape[1])  # (heads * (nope + v), kv_lora)

    def _expert_sources(self) -> dict[tuple[int, int], dict[str, tuple[GGUFTensor, int | None]]]:
        """(layer, expert) -> part (gate, up, down, gate_bias, ...) -> (tensor, index)."""
        out: dict[tuple[int, int], dict[str, tuple[GGUFTensor, int | None]]] = {}
        for name, t in self.tensor_map.items():
            if self._skipped(name):
                continue
            m = _STACKED_EXPERTS.match(name)
            if m:
                layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
                if len(t.shape) != (3 if kind == "weight" else 2):
                    want = "3-D (experts, out, in)" if kind == "weight" else "2-D (experts, out)"
                    raise ModelLoadError(f"{t.file}: tensor {name!r} should be {want}, got {t.shape}")
                for e in range(t.shape[0]):
                    out.setdefault((layer, e), {})[part if kind == "weight" else f"{part}_bias"] = (t, e)
                continue
            m = _LEGACY_EXPERT.match(name)
            if m:
                out.setdefault((int(m.group(1)), int(m.group(3))), {})[m.group(2)] = (t, None)
        return out

    def _expert_parts(self) -> frozenset[str]:
        """The canonical parts every expert comes as: MXFP4 codes when all expert matrices
        are MXFP4 (kept as they are), float weights otherwise, plus any biases."""
        from ..checkpoint import FLOAT_PARTS, MXFP4_PARTS

        sources = self._expert_sources()
        weights = {t.type_name for parts in sources.values() for p, (t, _) in parts.items() if p in FLOAT_PARTS}
        self._mxfp4 = weights == {"MXFP4"}
        biases = {p for parts in sources.values() for p in parts if p.endswith("_bias")}
        if ("gate_bias" in biases) != ("up_bias" in biases):
            raise ModelLoadError(f"{self.path}: routed experts have a gate or an up bias without the other")
        return (MXFP4_PARTS if self._mxfp4 else FLOAT_PARTS) | frozenset(biases)

    @property
    def expert_format(self) -> str | None:
        """"mxfp4" when the experts are MXFP4 codes, None for any other type."""
        return "mxfp4" if self._mxfp4 else None

    def expert_types(self) -> dict[tuple[int, int], tuple[str, str, str]]:
        """(layer, expert) -> GGUF types of its (gate, up, down)."""
        return {k: tuple(v[p][0].type_name if p in v else "?" for p in ("gate", "up", "down"))
                for k, v in self._expert_sources().items()}

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (edgemoe name, tensor) pairs like HFCheckpoint.tensors: the resident
        tensors first, then each expert's parts together under experts.L.E.<part> (one
        expert in memory at a time)."""
        experts = self._expert_sources()
        expert_tensors = {src[0].name for parts in experts.values() for src in parts.values()}

        def cast(w: torch.Tensor) -> torch.Tensor:
            return w.to(dtype) if dtype is not None and w.is_floating_point() else w

        joined = set()
        for name, t in self.tensor_map.items():
            if name in expert_tensors:
                continue
            m = re.match(r"blk\.(\d+)\.attn_[kv]_b\.weight$", name)
            if m and self.arch_name == "deepseek2" and not self._skipped(name):
                layer = int(m.group(1))
                if f"blk.{layer}.attn_kv_b.weight" not in self.tensor_map and layer not in joined:
                    joined.add(layer)
                    yield f"layers.{layer}.attn.kv_b.weight", cast(self._joined_kv_b(layer))
                continue
            got = self._canonical_tensor(name, t)
            if got is not None:
                yield got[0], cast(got[1])
        for (layer, e), parts in sorted(experts.items()):
            for part in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                if part not in parts:
                    continue
                t, index = parts[part]
                key = f"experts.{layer}.{e}.{part}"
                if self._mxfp4 and not part.endswith("_bias"):
                    blocks, scales = self._read_mxfp4(t, index)
                    yield key + "_blocks", blocks
                    yield key + "_scales", scales
                else:
                    yield key, cast(self._read(t, index))

    def build(self) -> Transformer:
        from ..checkpoint import build_on_meta

        return build_on_meta(self.family, self.args)

    @property
    def stream_bytes(self) -> int:
        """Bytes of the tensors `tensors()` yields (for a progress bar)."""
        total = 0
        for t in self.tensor_map.values():
            n = 1
            for d in t.shape:
                n *= d
            total += t.nbytes if t.type_name == "MXFP4" and self._mxfp4 else n * (2 if t.type_name == "F16" else 4)
        return total

    # -- converter integration

    def default_plan(self, dtype: torch.dtype):
        """The expert plan that keeps at least the GGUF's precision (see the module docstring)."""
        from .convert import FLOAT_FORMAT
        from .manifest import ExpertPlan

        if self._mxfp4:
            return ExpertPlan("mxfp4")  # the codes as they are

        def pick(types: tuple[str, ...]) -> str:
            if any(t in _FLOAT_TYPES for t in types):
                return FLOAT_FORMAT[dtype]
            return max((_EXPERT_FORMAT.get(t, "int8") for t in types), key=_FORMAT_RANK.__getitem__)

        chosen = {k: pick(v) for k, v in self.expert_types().items()}
        counts: dict[str, int] = {}
        for f in chosen.values():
            counts[f] = counts.get(f, 0) + 1
        default = max(counts, key=counts.get) if counts else FLOAT_FORMAT[dtype]
        return ExpertPlan(default, {}, {k: f for k, f in chosen.items() if f != default})

    def aux_files(self) -> dict[str, bytes]:
        """Files to write next to the converted weights: config and tokenizer."""
        files = {"config.json": json.dumps(self.config, indent=2).encode()}
        files.update(self.tokenizer_files)
        return files

    def write_aux_files(self, out: Path) -> list[str]:
        """Write `aux_files` into the directory `out`, each on disk (fsync) before the
        converter renames the directory into place; returns their names."""
        names = []
        for name, data in self.aux_files().items():
            with open(out / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            names.append(name)
        return names

    def observe_expert(self, layer: int, expert: int, fmt, source: dict[str, torch.Tensor],
                       parts: dict[str, torch.Tensor]) -> None:
        """Accumulate the error that storing this expert in `fmt` adds to the GGUF's own
        dequantized weights (called by the converter after encoding each expert)."""
        if self._types is None:
            self._types = self.expert_types()
        key = (self._types.get((layer, expert)), fmt.name)
        if "gate_blocks" in source:
            from ..quant.mxfp4 import dequantize_parts

            if fmt.name == "mxfp4":  # codes kept as they are: nothing added
                row = self._plan_rows.setdefault(key, [0, 0.0, 1.0, 0.0])
                row[0] += 1
                return
            gate, up, down = dequantize_parts(source, self.args.hidden_size, self.args.expert_dim)
            source = {"gate": gate, "up": up, "down": down}
        decoded = decode_expert(fmt, parts)
        if decoded is None:
            return
        w13, w2 = decoded
        ref13 = torch.cat([source["gate"], source["up"]], 0).float()
        ref2 = source["down"].float()
        err = float((w13 - ref13).pow(2).sum() + (w2 - ref2).pow(2).sum())
        ref = float(ref13.pow(2).sum() + ref2.pow(2).sum())
        row = self._plan_rows.setdefault(key, [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += err
        row[2] += ref
        row[3] = max(row[3], (err / ref) ** 0.5 if ref else 0.0)

    def report(self) -> list[str]:
        """One line per (GGUF types, edgemoe format): experts, relative RMS error added."""
        lines = []
        for (types, fmt), (n, err, ref, worst) in sorted(self._plan_rows.items(), key=lambda kv: str(kv[0])):
            src = "/".join(dict.fromkeys(types)) if types else "?"
            rel = (err / ref) ** 0.5 if ref else 0.0
            lines.append(f"experts {src} -> {fmt}: {n} experts, added error {100 * rel:.2f}% RMS of the GGUF's "
                         f"dequantized weights (worst expert {100 * worst:.2f}%)")
        return lines

    def added_error(self) -> dict[str, dict]:
        """The same as `report`, as data: "<types> -> <format>" -> {experts, rel_rms, worst}."""
        out = {}
        for (types, fmt), (n, err, ref, worst) in self._plan_rows.items():
            src = "/".join(dict.fromkeys(types)) if types else "?"
            out[f"{src} -> {fmt}"] = {"experts": n, "rel_rms": (err / ref) ** 0.5 if ref else 0.0, "worst": worst}
        return out



def unpermute_qk(w: torch.Tensor, heads: int, name: str = "", file: Path | None = None) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute`: per head, GGUF rows (pairs interleaved:
    r0, r_{d/2}, r1, r_{d/2+1}, ...) back to transformers' halves (r0..r_{d/2-1}, r_{d/2}..)."""
    rows = w.shape[0]
    if heads <= 0 or rows % (2 * heads):
        raise ModelLoadError(f"{file}: tensor {name!r} has {rows} rows, not a multiple of 2 x {heads} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's permutation (transformers' layout -> GGUF's); the inverse of `unpermute_qk`."""
    rows, rest = w.shape[0], tuple(w.shape[1:])
    return w.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def decode_expert(fmt, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An encoded expert's (w13, w2) as float32, for the formats edgemoe ships; None for
    another kind of format."""
    from ..quant.experts import GroupwiseFormat, Int8Format
    from ..quant.formats import FloatFormat
    from ..quant.kernels import dequant_rows

    if isinstance(fmt, FloatFormat):
        return parts["w13"].float(), parts["w2"].float()
    if isinstance(fmt, Int8Format):
        return (parts["w13.q"].float() * parts["w13.s"].float()[:, None],
                parts["w2.q"].float() * parts["w2.s"].float()[:, None])
    if isinstance(fmt, GroupwiseFormat):
        a, b = fmt.matrices(parts)
        return dequant_rows(a, 0, a.n), dequant_rows(b, 0, b.n)
    return None


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer_files(meta: dict, path: Path) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json from the GGUF vocabulary.

    Written with the `tokenizers` library (edgemoe's own dependency) rather than through
    transformers' GGUF support, which is a test-only dependency here; the tests check
    that both give the same token ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if meta.get(k) is None]
        raise ModelLoadError(f"{path}: missing tokenizer metadata ({', '.join(missing)}); edgemoe builds the "
                             "tokenizer from the GGUF vocabulary")
    if not isinstance(kind, str) or not isinstance(tokens, list) or not tokens \
            or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError(f"{path}: tokenizer metadata is malformed (tokenizer.ggml.model must be a string "
                             "and tokenizer.ggml.tokens a non-empty list of strings)")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    if not isinstance(types, list) or len(types) != n:
        raise ModelLoadError(f"{path}: tokenizer.ggml.token_type has {len(types) if isinstance(types, list) else '?'} "
                             f"entries for {n} tokens")

    def token_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise ModelLoadError(f"{path}: tokenizer.ggml.{key} is {v!r}, not a token id below {n}")
        return v

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") >= 1 for m in merges):
            raise ModelLoadError(f"{path}: tokenizer.ggml.merges must be a list of 'left right' strings")
        merges = [tuple(m.split(" ", 1)) for m in merges]

    def flag(key: str, default: bool) -> bool:
        v = meta.get(f"tokenizer.ggml.{key}")
        return v if isinstance(v, bool) else default

    try:
        if kind == "gpt2":
            if merges is None:
                raise ModelLoadError(f"{path}: missing tokenizer metadata (tokenizer.ggml.merges) for a BPE vocabulary")
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                raise ModelLoadError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                                     f"{', '.join(sorted(PRE_TOKENIZERS))})")
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
            split = PRE_TOKENIZERS[pre]
            if split is None:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                tok.pre_tokenizer = pre_tokenizers.Sequence(
                    [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split]
                    + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.decoder = decoders.ByteLevel()
            add_bos, add_eos = flag("add_bos_token", False), flag("add_eos_token", False)
        elif kind == "llama":
            if merges is None:
                scores = meta.get("tokenizer.ggml.scores")
                if not isinstance(scores, list) or len(scores) != n:
                    raise ModelLoadError(f"{path}: missing tokenizer metadata (tokenizer.ggml.scores) for a "
                                         "SentencePiece vocabulary without merges")
                merges = spm_merges(tokens, scores, types)
            if unk is None:
                unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                                       fuse_unk=True, byte_fallback=True))
            prefix = flag("add_space_prefix", True)
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never", split=False)
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            if prefix:
                steps.append(decoders.Strip(content=" ", left=1, right=0))
            tok.decoder = decoders.Sequence(steps)
            add_bos, add_eos = flag("add_bos_token", True), flag("add_eos_token", False)
        else:
            raise ModelLoadError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2 (byte-level "
                                 "BPE), llama (SentencePiece))")
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
        tok.add_special_tokens(special)
        tok.add_tokens(user)
        if (add_bos and bos is not None) or (add_eos and eos is not None):
            single = " ".join(([f"{tokens[bos]}:0"] if add_bos and bos is not None else []) + ["$A:0"]
                              + ([f"{tokens[eos]}:0"] if add_eos and eos is not None else []))
            pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
            used = {tokens[i]: i for i, on in ((bos, add_bos), (eos, add_eos)) if on and i is not None}
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))
        text = tok.to_str()
    except ModelLoadError:
        raise
    except Exception as e:  # the tokenizers library raises bare Exceptions on inconsistent vocabularies
        raise ModelLoadError(f"{path}: the tokenizer metadata is inconsistent: {' '.join(str(e).split())[:200]}") from None

    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                    "add_bos_token": add_bos, "add_eos_token": add_eos}
    for key, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if i is not None:
            config[key] = tokens[i]
    template = meta.get("tokenizer.chat_template")
    named = {k[len("tokenizer.chat_template."):]: v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{path}: tokenizer.chat_template must be a string")
    if named:
        config["chat_template"] = ([{"name": "default", "template": template}] if template else []) + \
            [{"name": k, "template": v} for k, v in sorted(named.items())]
    elif template:
        config["chat_template"] = template
    return {"tokenizer.json": text.encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def spm_merges(tokens: list[str], scores: list, types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens, best (highest-scoring) result first, as llama.cpp's SPM tokenizer merges.
    Control, unknown and byte tokens are never the result of a merge."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    found = []
    for i, t in enumerate(tokens):
        if types[i] in (UNKNOWN, CONTROL, BYTE) or vocab[t] != i:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    found.sort()
    return [(l, r) for *_, l, r in found]
