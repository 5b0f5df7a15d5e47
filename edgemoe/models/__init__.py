"""Model families. Adding one is a new file (ModelArgs, build, sanitize) plus an entry
in FAMILIES."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ModelLoadError

# config.json "model_type" -> module implementing the family.
FAMILIES: dict[str, str] = {
    "mixtral": "edgemoe.models.mixtral",
    "olmoe": "edgemoe.models.olmoe",
    "qwen2_moe": "edgemoe.models.qwen2_moe",
    "qwen3_moe": "edgemoe.models.qwen3_moe",
}


def get_family(model_type: str | None, source: str = "config.json") -> ModuleType:
    """The family module for a model_type, or a clear error listing the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ModelLoadError(
            f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        )
    return importlib.import_module(FAMILIES[model_type])
