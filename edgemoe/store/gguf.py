"""Reading a GGUF file (llama.cpp, Ollama, LM Studio) as a source for `edgemoe convert`.

`GGUFCheckpoint` offers what the converter uses of `checkpoint.HFCheckpoint` (`config`,
`family`, `args`, `tensors()`, `build()`) plus what only a GGUF needs: the files a
Hugging Face directory would carry (config.json, tokenizer.json, tokenizer_config.json)
built from the metadata, a default expert plan that keeps the file's precision, and a
report of the error that re-quantizing adds. Its tensors come out under Hugging Face names
so that the family's `sanitize` stays the one place of renaming; the GGUF -> HF table is
`_TENSOR_RULES` below.

The file is parsed by the `gguf` package (maintained with llama.cpp); tensor data is read
with pread, one expert at a time, and dequantized by `gguf.quants`. Nothing in a GGUF is
code: the chat template is Jinja, rendered in a sandbox by edgemoe/tokenizer.py.

What is kept of the source's quantization: relative RMS error added on top of the GGUF's
own dequantized weights, measured on Gaussian weights (with outlier columns: the larger
figure); every conversion reports the value it measured on the real weights:

    GGUF expert type               edgemoe format   bits/weight     added error
    F32 / F16 / BF16               --dtype float    32 / 16         0 / bf16 rounding (0.2 %)
    Q8_0 (32-blocks, fp16 scale)   int8             8.5 -> 8.0      0.7-1.6 %
    Q4_0 (32-blocks, 16 levels)    int4-asym        4.5 -> 4.5      7-9 % (Q4_0's own: ~10 %)
    Q4_1, Q5_0, Q5_1, Q5_K, Q6_K   int8             5-6.6 -> 8.0    ~0.7-1.6 %
    Q4_K, IQ3_*, IQ4_*             int4-asym        4.5 -> 4.5      ~7 % (Q4_K)
    Q2_K, Q3_K, IQ2_*, IQ1_*, TQ*  int3-asym, int4-asym, int2-asym (a level above the source's bits)

int4-asym rather than int4 for Q4_0: 9 % instead of 15 % added, at Q4_0's own 4.5 bits.

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

GGUF_MAGIC = b"GGUF"
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# A metadata array longer than this is corruption (vocabularies and merge lists are < 1M).
MAX_ARRAY = 1 << 26

# GGUF general.architecture -> (edgemoe family, description for messages).
ARCHITECTURES = {
    "llama": ("mixtral", "Mixtral (llama with experts)"),
    "qwen2moe": ("qwen2_moe", "Qwen2-MoE"),
    "qwen3moe": ("qwen3_moe", "Qwen3-MoE"),
    "olmoe": ("olmoe", "OLMoE"),
}

# GGUF tensor name -> Hugging Face name (the names each family's sanitize reads).
_TENSOR_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p + "$"), r)
    for p, r in [
        (r"token_embd\.weight", "model.embed_tokens.weight"),
        (r"output_norm\.weight", "model.norm.weight"),
        (r"output\.weight", "lm_head.weight"),
        (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
        (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
        (r"blk\.(\d+)\.attn_([qk])_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
        (r"blk\.(\d+)\.ffn_gate_inp\.weight", r"model.layers.\1.mlp.gate.weight"),
        (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
        (r"blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight", r"model.layers.\1.mlp.shared_expert.\2_proj.weight"),
        (r"blk\.(\d+)\.ffn_gate_inp_shexp\.weight", r"model.layers.\1.mlp.shared_expert_gate.weight"),
    ]
]
_STACKED_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")  # (E, out, in)
_LEGACY_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")  # old Mixtral files: one per expert

# Default expert format per GGUF type (see the module docstring): at least the source's
# bits per weight, one level up below 4 bits.
_EXPERT_FORMAT = {
    "Q8_0": "int8", "Q8_1": "int8", "Q8_K": "int8",
    "Q4_0": "int4-asym", "Q4_K": "int4-asym", "IQ4_NL": "int4-asym", "IQ4_XS": "int4-asym",
    "IQ3_XXS": "int4-asym", "IQ3_S": "int4-asym", "Q3_K": "int4-asym",
    "Q4_1": "int8", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "MXFP4": "int8",
    "Q2_K": "int3-asym", "IQ2_XXS": "int3-asym", "IQ2_XS": "int3-asym", "IQ2_S": "int3-asym",
    "IQ1_S": "int2-asym", "IQ1_M": "int2-asym", "TQ1_0": "int2-asym", "TQ2_0": "int2-asym",
}
# Larger = more bits; a mixed expert (Q4_K_M: gate/up Q4_K, down Q6_K) takes the largest.
_FORMAT_RANK = {"int2-asym": 0, "int3-asym": 1, "int4-asym": 2, "int8": 3}
_FLOAT_TYPES = ("F32", "F16", "BF16")

# tokenizer.ggml.pre -> pre-tokenizer split regex (None: GPT-2's, built into ByteLevel).
_GPT2_SPLIT = None
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT, "olmo": _GPT2_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"}  # as llama.cpp: whole words first

# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file: a name ending in .gguf that is not a directory
    (existing or not, so that a missing one is reported as a missing file), or a file
    starting with the GGUF magic. Cheap (reads 4 bytes); does not import the gguf package."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return True
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_load_error(path: str | Path) -> ModelLoadError:
    """The error for running a GGUF file directly (`edgemoe generate MODEL.gguf`)."""
    return ModelLoadError(f"{path}: a GGUF file; convert it first: edgemoe convert {path} OUT_DIR, "
                          "then run edgemoe generate OUT_DIR")


def check_not_gguf(path: str | Path) -> None:
    """Raise `gguf_load_error` if `path` is a GGUF file (for loaders of converted models)."""
    if is_gguf(path):
        raise gguf_load_error(path)


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


# ----------------------------------------------------------------------------- metadata helpers


class _Meta:
    """Typed access to GGUF metadata with errors naming the file and the key."""

    def __init__(self, meta: dict, path: Path, arch: str):
        self.meta, self.path, self.arch = meta, path, arch

    def get(self, key: str, kind: type | tuple, default=None, arch: bool = True):
        full = f"{self.arch}.{key}" if arch else key
        if full not in self.meta:
            return default
        value = self.meta[full]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong_bool = isinstance(value, bool) and bool not in kinds  # bool is an int subclass
        if wrong_bool or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise ModelLoadError(f"{self.path}: metadata {full} should be {want}, got {str(value)[:60]!r}")
        return value

    def need(self, key: str, kind, arch: bool = True):
        value = self.get(key, kind, None, arch)
        if value is None:
            full = f"{self.arch}.{key}" if arch else key
            raise ModelLoadError(f"{self.path}: metadata {full} is missing")
        return value


def _per_layer(value, key: str, m: _Meta):
    """Some files store a per-layer list (all layers equal for the families here)."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ModelLoadError(f"{m.path}: metadata {m.arch}.{key} differs between layers ({str(value)[:60]}); "
                                 "edgemoe's families need one value")
        return value[0]
    return value


# ----------------------------------------------------------------------------- the checkpoint


class GGUFCheckpoint:
    """A validated GGUF file (or split set) seen as a Hugging Face checkpoint."""

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
        self.arch = self.meta.get("general.architecture")
        if not isinstance(self.arch, str):
            raise ModelLoadError(f"{self.path}: metadata general.architecture is missing; not a model GGUF?")
        self._check_types()
        self.config = self._config()
        src = f"{self.path} (config from its GGUF metadata)"
        self.family: ModuleType = get_family(self.config["model_type"], src)
        self.args: BaseModelArgs = self.family.ModelArgs.from_dict(self.config, src)
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

    # -- config

    def _config(self) -> dict:
        if self.arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r} (supported: "
                + ", ".join(f"{a} ({d})" for a, (_, d) in sorted(ARCHITECTURES.items())) + ")")
        family = ARCHITECTURES[self.arch][0]
        m = _Meta(self.meta, self.path, self.arch)
        tm = self.tensor_map
        n_layers = m.need("block_count", int)
        if not 0 < n_layers <= 1024:
            raise ModelLoadError(f"{self.path}: metadata {self.arch}.block_count is {n_layers}, outside 1..1024")
        heads = _per_layer(m.need("attention.head_count", (int, list)), "attention.head_count", m)
        kv_heads = _per_layer(m.get("attention.head_count_kv", (int, list), heads), "attention.head_count_kv", m)
        hidden = m.need("embedding_length", int)
        emb = tm.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2:
            raise ModelLoadError(f"{self.path}: tensor token_embd.weight is missing or not 2-D")
        vocab = emb.shape[0]
        cfg: dict = {
            "model_type": family,
            "architectures": None,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": m.get("context_length", int, 4096),
            "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", float, 1e-6),
            "tie_word_embeddings": "output.weight" not in tm,
        }
        key_len, value_len = m.get("attention.key_length", int), m.get("attention.value_length", int)
        if key_len is not None and value_len is not None and key_len != value_len:
            raise ModelLoadError(f"{self.path}: attention key_length {key_len} != value_length {value_len} "
                                 "is not supported")
        if key_len is not None:
            cfg["head_dim"] = key_len
        elif isinstance(heads, int) and heads > 0 and m.get("rope.dimension_count", int) not in (None, hidden // heads):
            cfg["head_dim"] = m.get("rope.dimension_count", int)
        cfg["rope_theta"] = m.get("rope.freq_base", float, 10000.0)
        scaling = self._rope_scaling(m)
        if scaling:
            cfg["rope_scaling"] = scaling
        if "rope_freqs.weight" in tm:
            raise ModelLoadError(f"{self.path}: rope frequency factors (rope_freqs.weight, llama3-style rope "
                                 "scaling baked into a tensor) are not supported")

        experts = m.get("expert_count", int, 0)
        used = m.get("expert_used_count", int, 0)
        moe_layers = sorted({int(mt.group(1)) for n in tm if (mt := re.match(r"blk\.(\d+)\.ffn_gate_inp\.weight$", n))})
        if experts <= 0 or not moe_layers:
            raise ModelLoadError(f"{self.path}: a dense {self.arch} model ({self.arch}.expert_count "
                                 f"{experts}, no blk.N.ffn_gate_inp router); edgemoe runs Mixture-of-Experts models")
        expert_dim = m.get("expert_feed_forward_length", int)
        if expert_dim is None:
            expert_dim = self._expert_dim()
        dense_dim = _per_layer(m.get("feed_forward_length", (int, list)), "feed_forward_length", m)
        norm = m.get("expert_weights_norm", bool)
        bias = "blk.0.attn_q.bias" in tm
        cfg["bos_token_id"] = self.meta.get("tokenizer.ggml.bos_token_id")
        eos = [self.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)

        if family == "mixtral":
            if len(moe_layers) != n_layers:
                raise ModelLoadError(f"{self.path}: a llama MoE whose layers are not all MoE is not supported")
            cfg.update(intermediate_size=expert_dim, num_local_experts=experts, num_experts_per_tok=used,
                       sliding_window=m.get("attention.sliding_window", int))
            if norm is False:
                raise ModelLoadError(f"{self.path}: {self.arch}.expert_weights_norm false is not supported for llama")
        else:
            dense = [i for i in range(n_layers) if i not in moe_layers]
            if family == "qwen2_moe":
                shared = m.get("expert_shared_feed_forward_length", int)
                if shared is None:
                    t = tm.get(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight")
                    shared = t.shape[0] if t is not None else 0
                cfg.update(moe_intermediate_size=expert_dim, shared_expert_intermediate_size=shared,
                           num_experts=experts, num_experts_per_tok=used, norm_topk_prob=bool(norm),
                           decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=bias, use_sliding_window=False)
            elif family == "qwen3_moe":
                # llama.cpp always renormalises Qwen3-MoE's top-k weights (as its checkpoints say).
                cfg.update(moe_intermediate_size=expert_dim, num_experts=experts, num_experts_per_tok=used,
                           norm_topk_prob=True if norm is None else norm, decoder_sparse_step=1,
                           mlp_only_layers=dense, attention_bias=bias, use_sliding_window=False)
            else:  # olmoe
                if dense:
                    raise ModelLoadError(f"{self.path}: an OLMoE whose layers are not all MoE is not supported")
                cfg.update(intermediate_size=expert_dim, num_experts=experts, num_experts_per_tok=used,
                           norm_topk_prob=bool(norm), attention_bias=bias)
                clip = m.get("attention.clamp_kqv", float)
                if clip is not None:
                    cfg["clip_qkv"] = clip
            if dense:
                if dense_dim is None:
                    t = tm.get(f"blk.{dense[0]}.ffn_gate.weight")
                    dense_dim = t.shape[0] if t is not None else None
                if dense_dim is not None:
                    cfg["intermediate_size"] = dense_dim
        cfg["torch_dtype"] = "float32" if self._all_f32() else "bfloat16"
        cfg["gguf"] = {"file": self.files[0].name, "architecture": self.arch,
                       "name": self.meta.get("general.name"), "file_type": self.meta.get("general.file_type")}
        return {k: v for k, v in cfg.items() if v is not None}

    def _rope_scaling(self, m: _Meta) -> dict | None:
        kind = m.get("rope.scaling.type", str)
        factor = m.get("rope.scaling.factor", float)
        linear = m.get("rope.scale_linear", float)  # older files
        if kind in (None, "none"):
            if linear is not None and linear != 1.0:
                return {"rope_type": "linear", "factor": linear}
            return None
        if kind not in ("linear", "yarn"):
            raise ModelLoadError(f"{self.path}: metadata {self.arch}.rope.scaling.type {kind!r} is not supported "
                                 "(supported: none, linear, yarn)")
        out = {"rope_type": kind, "factor": factor if factor is not None else 1.0}
        orig = m.get("rope.scaling.original_context_length", int)
        if orig is not None:
            out["original_max_position_embeddings"] = orig
        for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            v = m.get(key, float)
            if v is not None:
                out[hf] = v
        return out

    def _expert_dim(self) -> int:
        for name, t in self.tensor_map.items():
            if _STACKED_EXPERTS.match(name) and len(t.shape) == 3:
                part = _STACKED_EXPERTS.match(name).group(2)
                return t.shape[2] if part == "down" else t.shape[1]
            if _LEGACY_EXPERT.match(name) and len(t.shape) == 2:
                part = _LEGACY_EXPERT.match(name).group(2)
                return t.shape[1] if part == "down" else t.shape[0]
        raise ModelLoadError(f"{self.path}: no expert tensors (blk.N.ffn_gate_exps.weight) found")

    def _all_f32(self) -> bool:
        return all(t.type_name == "F32" for t in self.tensor_map.values())

    # -- tensors

    def _read(self, t: GGUFTensor, index: int | None = None) -> torch.Tensor:
        """Tensor `t` (or its slice `index` along the first axis) dequantized to float32
        (F16 and F32 keep their dtype), in Hugging Face orientation."""
        gguf = _gguf()
        shape = t.shape if index is None else t.shape[1:]
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
        data = np.frombuffer(raw, dtype=np.uint8)
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

    def _hf_tensor(self, name: str, t: GGUFTensor) -> tuple[str, torch.Tensor]:
        for pattern, repl in _TENSOR_RULES:
            if pattern.match(name):
                hf = pattern.sub(repl, name)
                break
        else:
            raise ModelLoadError(f"{t.file}: tensor {name!r} is not used by edgemoe's {self.config['model_type']} "
                                 f"(unexpected in a GGUF of architecture {self.arch})")
        w = self._read(t)
        a = self.args
        if self.arch == "llama" and re.search(r"self_attn\.[qk]_proj\.", hf):
            # llama.cpp's converter interleaves the two RoPE halves of each q/k head for
            # its rotation; undo it to get transformers' rotate-half layout back.
            heads = a.num_attention_heads if ".q_proj." in hf else a.num_key_value_heads
            w = unpermute_qk(w, heads, name, t.file)
        if hf.endswith("shared_expert_gate.weight") and w.dim() == 1:
            w = w.unsqueeze(0)  # stored as (H,), transformers' Linear(H, 1) is (1, H)
        return hf, w

    def _expert_sources(self) -> dict[tuple[int, int], dict[str, tuple[GGUFTensor, int | None]]]:
        out: dict[tuple[int, int], dict[str, tuple[GGUFTensor, int | None]]] = {}
        for name, t in self.tensor_map.items():
            m = _STACKED_EXPERTS.match(name)
            if m:
                layer, part = int(m.group(1)), m.group(2)
                if len(t.shape) != 3:
                    raise ModelLoadError(f"{t.file}: tensor {name!r} should be 3-D (experts, out, in), got {t.shape}")
                for e in range(t.shape[0]):
                    out.setdefault((layer, e), {})[part] = (t, e)
                continue
            m = _LEGACY_EXPERT.match(name)
            if m:
                out.setdefault((int(m.group(1)), int(m.group(3))), {})[m.group(2)] = (t, None)
        return out

    def expert_types(self) -> dict[tuple[int, int], tuple[str, str, str]]:
        """(layer, expert) -> GGUF types of its (gate, up, down)."""
        return {k: tuple(v[p][0].type_name if p in v else "?" for p in ("gate", "up", "down"))
                for k, v in self._expert_sources().items()}

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical_name, tensor) pairs like HFCheckpoint.tensors: non-expert tensors
        first, then each expert's gate, up and down together (one expert in memory at a time)."""
        experts = self._expert_sources()
        expert_tensors = {src[0].name for parts in experts.values() for src in parts.values()}

        def emit(hf: str, w: torch.Tensor, file: Path):
            if dtype is not None and w.is_floating_point():
                w = w.to(dtype)
            try:
                yield from self.family.sanitize(hf, w)
            except ModelLoadError as e:
                raise ModelLoadError(f"{file}: {e}") from None

        for name, t in self.tensor_map.items():
            if name not in expert_tensors:
                hf, w = self._hf_tensor(name, t)
                yield from emit(hf, w, t.file)
        for (layer, e), parts in sorted(experts.items()):
            for part in ("gate", "up", "down"):
                if part in parts:
                    t, index = parts[part]
                    hf = f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"
                    yield from emit(hf, self._read(t, index), t.file)

    def build(self) -> Transformer:
        from ..checkpoint import build_on_meta

        return build_on_meta(self.family, self.args)

    @property
    def stream_bytes(self) -> int:
        """Bytes of the float tensors `tensors()` yields (for a progress bar)."""
        total = 0
        for t in self.tensor_map.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n * (2 if t.type_name == "F16" else 4)
        return total

    # -- converter integration

    def default_plan(self, dtype: torch.dtype):
        """The expert plan that keeps at least the GGUF's precision (see the module docstring)."""
        from .convert import FLOAT_FORMAT
        from .format import ExpertPlan

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
        decoded = decode_expert(fmt, parts)
        if decoded is None:
            return
        w13, w2 = decoded
        ref13 = torch.cat([source["gate"], source["up"]], 0).float()
        ref2 = source["down"].float()
        err = float((w13 - ref13).pow(2).sum() + (w2 - ref2).pow(2).sum())
        ref = float(ref13.pow(2).sum() + ref2.pow(2).sum())
        if self._types is None:
            self._types = self.expert_types()
        key = (self._types.get((layer, expert)), fmt.name)
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
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ])
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
