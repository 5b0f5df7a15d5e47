"""Reading a Hugging Face model directory: config.json plus single or sharded
safetensors, one tensor at a time.

`HFCheckpoint` validates the directory up front and streams sanitized tensors, so the
in-RAM loader and the offline converter share one reader and one set of error
messages. Pickle checkpoints (*.bin, *.pt) are refused: we never unpickle files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError
from .jsonfile import read_json
from .models import get_family, sanitizer
from .store.names import check_not_gguf
from .models.base import EXPERT_KEY, BaseModelArgs, Transformer, short_repr
from .experts import DenseExpert, UngatedDenseExpert
from .models.moe import InRAMProvider
from .store.tensorfile import TensorFileError, iter_tensors

# safetensors dtypes a weight may have; integer, bool and float8 tensors only appear in
# quantized checkpoints, whose scales edgemoe does not read, except MXFP4 experts (below).
FLOAT_CODES = ("F32", "F16", "BF16", "F64")
# An MXFP4 checkpoint (quantization_config.quant_method "mxfp4", the gpt-oss release)
# stores its expert matrices as uint8 codes `<name>_blocks` and exponents `<name>_scales`.
MXFP4_SUFFIXES = ("_blocks", "_scales")

# The parts one expert may come as (canonical names, see models.base.EXPERT_KEY).
FLOAT_PARTS = frozenset({"gate", "up", "down"})
# Ungated experts (args.expert_gated False: Switch Transformers, NLLB-MoE): the input
# matrix as "gate", and "down".
UNGATED_PARTS = frozenset({"gate", "down"})
MXFP4_PARTS = frozenset(f"{p}{s}" for p in ("gate", "up", "down") for s in MXFP4_SUFFIXES)
BIAS_PARTS = frozenset({"gate_bias", "up_bias", "down_bias"})
PART_ORDER = ("gate", "up", "down", *sorted(MXFP4_PARTS), "gate_bias", "up_bias", "down_bias")


def lacking_parts(want: frozenset[str], have) -> list[str]:
    """The parts of `want` not in `have`, in a stable, readable order."""
    return [n for n in PART_ORDER if n in want and n not in have]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def read_config(path: Path) -> dict:
    """Parse `path/config.json`, naming the file in every error."""
    if not path.exists():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not path.is_dir():
        check_not_gguf(path)  # a GGUF file: say to convert it first
        raise ModelLoadError(f"{path}: not a directory")
    cfg_file = path / "config.json"
    if cfg_file.exists() and not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: not a regular file")
    if not cfg_file.exists():
        raise ModelLoadError(f"{cfg_file}: missing (not a Hugging Face model directory?)")
    return read_json(cfg_file, ModelLoadError)


def config_dtype(config: dict) -> torch.dtype:
    """Compute dtype implied by the checkpoint: fp32 stays fp32, half types run in bf16
    (fp16 matmuls are slow on most CPUs)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None and isinstance(config.get("quantization_config"), dict):
        # Quantized releases keep their other weights in half precision and may not say
        # so (gpt-oss's MXFP4 config.json has no dtype; its other tensors are bf16).
        return torch.bfloat16
    name = name or "float32"
    return torch.float32 if DTYPES.get(str(name)) == torch.float32 else torch.bfloat16


def parse_dtype(name: str | torch.dtype | None, config: dict) -> torch.dtype:
    if name is None or name == "auto":
        return config_dtype(config)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def read_index(index: Path) -> list[str]:
    """The shard file names listed by `model.safetensors.index.json`."""
    if not index.is_file():
        raise ModelLoadError(f"{index}: not a regular file")
    data = read_json(index, ModelLoadError, "not a valid safetensors index (invalid JSON: {e})", None)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(
            f"{index}: not a valid safetensors index (weight_map must be a non-empty object mapping tensor "
            f"names to shard files, got {short_repr(weight_map)})"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise ModelLoadError(
                f"{index}: weight_map entry {short_repr(name)}: {short_repr(shard)} is not a shard file name "
                "in the model directory"
            )
    return sorted(set(weight_map.values()))


@dataclass
class TensorRef:
    name: str  # name in the checkpoint
    file: Path
    dtype: str = ""  # safetensors dtype code
    shape: tuple[int, ...] = ()


def is_mxfp4(config: dict) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


class HFCheckpoint:
    """A validated Hugging Face directory. Nothing but the safetensors headers is read
    until tensors are requested."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        cfg_file = self.path / "config.json"
        model_type = self.config.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ModelLoadError(f"{cfg_file}: model_type must be a string, got {short_repr(model_type)}")
        self.family: ModuleType = get_family(model_type, str(cfg_file))
        self.args: BaseModelArgs = self.family.ModelArgs.from_dict(self.config, str(cfg_file))
        self.sanitize = sanitizer(self.family, self.args)
        self.refs = self._index()
        self.expert_parts = self._expert_parts()

    def _index(self) -> list[TensorRef]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            files = read_index(index)
        elif single.exists():
            files = [single.name]
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not shards:
                pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
                hint = " (pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
                raise ModelLoadError(f"{self.path}: no *.safetensors weights found{hint}")
            files = shards
        refs = []
        mxfp4 = is_mxfp4(self.config)
        for name in files:
            file = self.path / name
            if not file.exists():
                raise ModelLoadError(f"{file}: weight shard listed in the index is missing")
            try:
                with safe_open(str(file), "pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        dtype = sl.get_dtype()
                        packed = mxfp4 and dtype == "U8" and k.endswith(MXFP4_SUFFIXES)
                        if dtype == "U8" and k.endswith(MXFP4_SUFFIXES) and not mxfp4:
                            raise ModelLoadError(
                                f"{file}: tensor {k!r} looks like MXFP4 data, but config.json has no "
                                "quantization_config with quant_method \"mxfp4\""
                            )
                        if dtype not in FLOAT_CODES and not packed:
                            raise ModelLoadError(
                                f"{file}: tensor {k!r} has dtype {dtype}; edgemoe loads floating-point weights "
                                f"only ({', '.join(FLOAT_CODES)}), quantized checkpoints are not supported "
                                "(except MXFP4 experts)"
                            )
                        refs.append(TensorRef(k, file, dtype, tuple(sl.get_shape())))
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{file}: unreadable safetensors file (truncated or corrupted?): {e}") from None
        return refs

    def _expert_parts(self) -> frozenset[str]:
        """The parts every routed expert comes as (gate/up/down or their MXFP4 codes,
        plus any biases), from the names and shapes in the headers: the loaders know from
        it when an expert is complete."""
        from .store.tensorfile import DTYPE_CODES

        found: set[str] = set()
        for r in self.refs:
            if r.dtype not in DTYPE_CODES:
                continue  # refused by tensors() with the file named
            meta = torch.empty(r.shape, dtype=DTYPE_CODES[r.dtype], device="meta")
            try:
                named = self.sanitize(r.name, meta)
            except ModelLoadError as e:
                raise ModelLoadError(f"{r.file}: {e}") from None
            except (RuntimeError, NotImplementedError):  # a sanitize that reads values: plain experts
                return FLOAT_PARTS if self.args.expert_gated else UNGATED_PARTS
            for key, _ in named:
                m = EXPERT_KEY.match(key)
                if m:
                    found.add(m.group(3))
        # Missing parts are reported per expert by the loaders; a mix of kinds is refused here.
        weights, biases = found - BIAS_PARTS, found & BIAS_PARTS
        if not self.args.expert_gated:
            parts = UNGATED_PARTS | (biases - {"up_bias"})
        elif weights <= FLOAT_PARTS:
            parts = FLOAT_PARTS | biases
        elif weights <= MXFP4_PARTS:
            parts = MXFP4_PARTS | biases
        else:
            raise ModelLoadError(f"{self.path}: routed experts come both as float weights and as MXFP4 blocks "
                                 f"and scales ({', '.join(p for p in PART_ORDER if p in weights)})")
        if self.args.expert_gated and ("gate_bias" in parts) != ("up_bias" in parts):
            raise ModelLoadError(f"{self.path}: routed experts have a gate or an up bias without the other")
        return parts

    @property
    def expert_format(self) -> str | None:
        """"mxfp4" when the experts are stored as MXFP4 codes, None for float weights."""
        return "mxfp4" if "gate_blocks" in self.expert_parts else None

    def tensors(self, dtype: torch.dtype | None = None, fp32: set[str] | frozenset = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical_name, tensor) pairs, one checkpoint tensor at a time, float ones
        cast to `dtype` except the canonical names in `fp32` (kept in float32)."""
        by_file: dict[Path, list[str]] = {}
        for r in self.refs:
            by_file.setdefault(r.file, []).append(r.name)
        for file, names in by_file.items():
            # Read with pread, not safetensors' mmap: mapped pages a copy touches stay in
            # RSS until the file closes, which would make a shard cost its whole size.
            try:
                for name, tensor in iter_tensors(file, names):
                    try:
                        out = self.sanitize(name, tensor)
                    except ModelLoadError as e:
                        raise ModelLoadError(f"{file}: {e}") from None
                    for key, t in out:
                        if dtype is not None and t.is_floating_point():
                            t = t.to(torch.float32 if key in fp32 else dtype)
                        yield key, t
            except TensorFileError as e:
                raise ModelLoadError(f"{e} (truncated or corrupted?)") from None
            except OSError as e:
                raise ModelLoadError(f"{file}: cannot read tensor data (truncated or corrupted?): {e}") from None

    def build(self) -> Transformer:
        """The family's model with weights on the meta device (no memory)."""
        return build_on_meta(self.family, self.args)


def build_on_meta(family: ModuleType, args: BaseModelArgs) -> Transformer:
    """A family's model with weights on the meta device. `nn.init.normal_` is skipped while
    building: initialising meta tensors is pointless, and normal_ on them imports
    torch._dynamo (seconds and ~80 MB of RSS, which would count against a memory budget)."""
    real = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            model = family.build(args)
    finally:
        torch.nn.init.normal_ = real
    routable = args.routable_experts()  # per-layer pruned: padding slots are never routed to
    if routable is not None:
        for block in model.moe_blocks():
            block.router.limit(routable[block.layer])
    return model


def expected_expert_shape(args: BaseModelArgs, part: str) -> tuple[int, ...]:
    """Shape of one canonical expert part (see models.base.EXPERT_KEY)."""
    from .quant.mxfp4 import BLOCK_BYTES, groups

    H, I = args.hidden_size, args.expert_dim
    out, k = (H, I) if part.startswith("down") else (I, H)
    if part.endswith("_bias"):
        return (out,)
    if part.endswith("_blocks"):
        return (out, groups(k), BLOCK_BYTES)
    if part.endswith("_scales"):
        return (out, groups(k))
    return (out, k)


def check_expert_tensor(args: BaseModelArgs, key: str, tensor: torch.Tensor, source: str) -> tuple[int, int, str]:
    """Validate a canonical expert tensor name and shape; returns (layer, expert, part)."""
    m = EXPERT_KEY.match(key)
    layer, expert, part = int(m.group(1)), int(m.group(2)), m.group(3)
    if layer not in set(args.moe_layers()) or not 0 <= expert < args.experts_per_layer:
        raise ModelLoadError(f"{source}: tensor for layer {layer} expert {expert} does not fit the config")
    want = expected_expert_shape(args, part)
    packed = part.endswith(MXFP4_SUFFIXES)
    if packed != (tensor.dtype == torch.uint8) or (not packed and not tensor.is_floating_point()):
        raise ModelLoadError(f"{source}: layer {layer} expert {expert} {part} has dtype {tensor.dtype}, expected "
                             + ("uint8 MXFP4 data" if packed else "a float type"))
    if tuple(tensor.shape) != want:
        raise ModelLoadError(
            f"{source}: layer {layer} expert {expert} {part} has shape {tuple(tensor.shape)}, expected {want}"
        )
    return layer, expert, part


def load_resident(model: Transformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Assign resident tensors to a meta-device model, checking names and shapes."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # buffers: int8 layers
    if model.args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ModelLoadError(f"{source}: tensors that do not fit the config: {', '.join(unknown[:5])}")
    missing = sorted(set(params) - set(tensors))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensors: {', '.join(missing[:5])}{more}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval().requires_grad_(False)


def attach_provider(model: Transformer, provider) -> None:
    for block in model.moe_blocks():
        block.provider = provider


def expert_biases(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert's biases as the store and the experts hold them: b13 (2I,) = gate then
    up, b2 (H,) = down; absent ones are left out."""
    out = {}
    if "gate_bias" in parts:  # ungated experts: the input matrix's bias alone
        out["b13"] = torch.cat([parts["gate_bias"], parts["up_bias"]]) if "up_bias" in parts else parts["gate_bias"]
    if "down_bias" in parts:
        out["b2"] = parts["down_bias"]
    return out


def bias_names(parts) -> tuple[str, ...]:
    """The stored bias tensors (b13, b2) experts with these canonical parts carry."""
    return tuple(n for n, src in (("b13", "gate_bias"), ("b2", "down_bias")) if src in parts)


def make_expert(parts: dict[str, torch.Tensor], act: str, dtype: torch.dtype):
    """An in-RAM expert from its complete canonical parts: float weights make a
    DenseExpert; MXFP4 codes stay codes (an MXFP4 expert, a quarter of the bytes)."""
    biases = {k: v.to(dtype) for k, v in expert_biases(parts).items()}
    if "gate_blocks" in parts:
        from .quant.mxfp4 import FORMAT

        return FORMAT.expert({**FORMAT.encode_codes(parts), **biases}, act, dtype)
    if "up" not in parts:  # ungated (UNGATED_PARTS)
        return UngatedDenseExpert(parts["gate"], parts["down"], act, biases.get("b13"), biases.get("b2"))
    return DenseExpert(parts["gate"], parts["up"], parts["down"], act, biases.get("b13"), biases.get("b2"))


def load_hf(path: str | Path, dtype: str | torch.dtype | None = None) -> tuple[Transformer, HFCheckpoint]:
    """Load a Hugging Face MoE checkpoint entirely into RAM, experts included."""
    ckpt = HFCheckpoint(path)
    args = ckpt.args
    dt = parse_dtype(dtype, ckpt.config)
    model = ckpt.build()
    resident: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in ckpt.tensors(dt, model.fp32_names()):
        if EXPERT_KEY.match(key):
            layer, expert, part = check_expert_tensor(args, key, tensor, str(ckpt.path))
            parts.setdefault((layer, expert), {})[part] = tensor
        else:
            resident[key] = tensor
    load_resident(model, resident, str(ckpt.path))
    experts = {}
    for layer in args.moe_layers():
        for e in range(args.experts_per_layer):
            p = parts.get((layer, e), {})
            lacking = lacking_parts(ckpt.expert_parts, p)
            if lacking:
                raise ModelLoadError(f"{ckpt.path}: layer {layer} expert {e} is missing {', '.join(lacking)} weights")
            experts[(layer, e)] = make_expert(p, args.expert_act, dt)
    attach_provider(model, InRAMProvider(experts))
    return model, ckpt
