"""Model families and the blocks they are built from (attention.py, mla.py, recurrent.py,
mamba.py, rope.py, norms.py, routers.py, moe.py, rows.py). Adding a family is a new file
(ModelArgs, build, sanitize) plus an entry in FAMILIES.

Model code does no I/O: MoE blocks get their experts from a provider (moe.py), and
nothing here imports runtime/, store/, quant/ or cli/ (tests/test_imports.py)."""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType

from ..errors import ModelLoadError

# config.json "model_type" -> module implementing the family.
FAMILIES: dict[str, str] = {
    "mixtral": "edgemoe.models.mixtral",
    "olmoe": "edgemoe.models.olmoe",
    "qwen2_moe": "edgemoe.models.qwen2_moe",
    "qwen3_moe": "edgemoe.models.qwen3_moe",
    "deepseek_v2": "edgemoe.models.deepseek_v2",
    "deepseek_v3": "edgemoe.models.deepseek_v3",
    "glm4_moe_lite": "edgemoe.models.glm4_moe_lite",
    "llama4": "edgemoe.models.llama4",  # multimodal checkpoints: the text model only
    "llama4_text": "edgemoe.models.llama4",
    "gpt_oss": "edgemoe.models.gpt_oss",
    "granitemoe": "edgemoe.models.granitemoe",
    "granitemoeshared": "edgemoe.models.granitemoeshared",
    "flex_olmo": "edgemoe.models.flex_olmo",
    "gemma4": "edgemoe.models.gemma4",
    "gemma4_text": "edgemoe.models.gemma4",
    "exaone_moe": "edgemoe.models.exaone_moe",
    "afmoe": "edgemoe.models.afmoe",
    "sarvam_moe": "edgemoe.models.sarvam_moe",
    "glm4_moe": "edgemoe.models.glm4_moe",
    "dots1": "edgemoe.models.dots1",
    "minimax_m2": "edgemoe.models.minimax_m2",
    "ernie4_5_moe": "edgemoe.models.ernie4_5_moe",
    "hunyuan_v1_moe": "edgemoe.models.hunyuan_v1_moe",
    "phimoe": "edgemoe.models.phimoe",
    "qwen3_next": "edgemoe.models.qwen3_next",
    "qwen3_5_moe": "edgemoe.models.qwen3_5_moe",  # multimodal checkpoints: the text model only
    "qwen3_5_moe_text": "edgemoe.models.qwen3_5_moe",
    "lfm2_moe": "edgemoe.models.lfm2_moe",
    "jamba": "edgemoe.models.jamba",
    "granitemoehybrid": "edgemoe.models.granitemoehybrid",
    "dbrx": "edgemoe.models.dbrx",
    "cohere2_moe": "edgemoe.models.cohere2_moe",
    "jetmoe": "edgemoe.models.jetmoe",
    "switch_transformers": "edgemoe.models.switch_transformers",  # encoder-decoder (edgemoe.seq2seq)
    "nllb-moe": "edgemoe.models.nllb_moe",  # encoder-decoder (edgemoe.seq2seq)
}


def get_family(model_type: str | None, source: str = "config.json") -> ModuleType:
    """The family module for a model_type, or a clear error listing the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ModelLoadError(
            f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        )
    return importlib.import_module(FAMILIES[model_type])


def sanitizer(family: ModuleType, args):
    """The family's `sanitize(name, tensor)`, bound to its config when the layout of its
    tensors depends on it (a family then declares `sanitize(name, tensor, args)`, e.g.
    DBRX, whose fused (E*I, H) expert tensors need the expert count to be split)."""
    if "args" in inspect.signature(family.sanitize).parameters:
        return functools.partial(family.sanitize, args=args)
    return family.sanitize
