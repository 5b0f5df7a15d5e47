"""RoPE settings from a GGUF: transformers-5 `rope_parameters` built from llama.cpp's
rope.scaling.* metadata, and llama3 scaling recovered from the frequency factors the
converter bakes into a rope_freqs tensor (Llama 3.x, Llama 4)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

def rope_parameters(c, theta: float, freqs: np.ndarray | None) -> dict:
    """transformers-5 rope_parameters from the rope.scaling.* metadata, or from llama.cpp's
    rope_freqs tensor (llama3-style frequency factors baked in by the converter). `c` is
    the architecture's gguf_archs.Ctx."""
    out: dict = {"rope_type": "default", "rope_theta": theta}
    m = c.m
    kind = m.get("rope.scaling.type", str)
    factor = m.get("rope.scaling.factor", float)
    linear = m.get("rope.scale_linear", float)  # older files
    if freqs is not None:
        if kind not in (None, "none"):
            raise c.fail(f"both rope_freqs.weight and rope.scaling.type {kind!r}: not supported")
        scaling = llama3_from_factors(freqs, theta, c.head_dim, m.get("rope.scaling.original_context_length", int),
                                      c.path)
        return {**out, **scaling} if scaling else out
    if kind in (None, "none"):
        if linear is not None and linear != 1.0:
            out.update(rope_type="linear", factor=linear)
        return out
    if kind not in ("linear", "yarn"):
        raise c.fail(f"metadata {c.arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear, yarn)")
    out.update(rope_type=kind, factor=factor if factor is not None else 1.0)
    orig = m.get("rope.scaling.original_context_length", int)
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                    ("rope.scaling.attn_factor", "attention_factor")):
        v = m.get(key, float)
        if v is not None:
            out[hf] = v
    return out


def _llama3_factors(inv: np.ndarray, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """The frequency factors llama.cpp's converter writes for llama3 rope (LlamaModel)."""
    wavelen = 2 * math.pi / inv
    out = np.empty_like(inv)
    for i, w in enumerate(wavelen):
        if w < old / high:
            out[i] = 1.0
        elif w > old / low:
            out[i] = factor
        else:
            smooth = (old / w - low) / (high - low)
            out[i] = 1 / ((1 - smooth) / factor + smooth)
    return out


def llama3_from_factors(freqs: np.ndarray, theta: float, dim: int, old: int | None, path: Path) -> dict | None:
    """llama3 rope parameters that reproduce the rope_freqs factors (dim/2,) exactly, or
    None for all ones. Factors are 1 for short wavelengths, `factor` for long ones and
    1 / ((1 - s) / factor + s) between, s linear in 1/wavelength; the band's ends come
    from two points inside it, or sit halfway between its neighbours when it has fewer.
    The recovered parameters are checked by recomputing the factors."""
    ff = np.asarray(freqs, dtype=np.float64).reshape(-1)
    if ff.shape[0] != dim // 2 or not np.all(np.isfinite(ff)) or np.any(ff <= 0):
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight should hold {dim // 2} positive factors, "
                             f"got {ff.shape[0]}")
    if np.allclose(ff, 1.0, rtol=0, atol=1e-7):
        return None
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # rising wavelengths
    inv_wl = inv / (2 * math.pi)
    factor = float(ff.max())
    one = np.isclose(ff, 1.0, rtol=1e-6, atol=0)
    top = np.isclose(ff, factor, rtol=1e-6, atol=0)
    if top.all():
        return {"rope_type": "linear", "factor": factor}
    band = ~one & ~top
    old = float(old or 8192)  # the converter's default (it reads original_max_position_embeddings)
    idx = np.nonzero(band)[0]
    if len(idx) >= 2:
        s = (1 / ff[idx] - 1 / factor) / (1 - 1 / factor)  # = a / wavelen - b
        a, b = np.polyfit(inv_wl[idx], s, 1)
        a, b = float(a), -float(b)
        low, high = b * old / a, (b + 1) * old / a
    else:
        # Short wavelengths end at k_lo, long ones start at k_hi (ff rises with the index).
        k_lo = int(np.nonzero(one)[0].max()) if one.any() else -1
        k_hi = int(np.nonzero(top)[0].min()) if top.any() else len(ff)
        x = lambda k: old * inv_wl[k] if 0 <= k < len(ff) else (math.inf if k < 0 else 0.0)  # noqa: E731
        if len(idx) == 0:
            # A hard cut (Llama 4 ships low = high): the edge halfway between the two.
            cut = math.sqrt(x(k_lo) * x(k_hi)) if 0 < x(k_hi) < x(k_lo) < math.inf else (x(k_lo) or x(k_hi)) / 2
            low = high = cut
        else:
            k = int(idx[0])
            s = (1 / ff[k] - 1 / factor) / (1 - 1 / factor)
            t = 0.5 * min(((x(k_lo) - x(k)) / (1 - s)) if x(k_lo) < math.inf else 1.0,
                          (x(k) - x(k_hi)) / s if s > 0 else 1.0)
            low, high = x(k) - s * t, x(k) + (1 - s) * t
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
              "high_freq_factor": float(high), "original_max_position_embeddings": int(old)}
    if low == high:
        got = np.where(2 * math.pi / inv < old / high, 1.0, factor)
    else:
        got = _llama3_factors(inv, factor, low, high, old)
    if not np.allclose(got, ff, rtol=1e-5, atol=0):
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight holds frequency factors that are not llama3 rope "
                             "scaling; not supported")
    return params
