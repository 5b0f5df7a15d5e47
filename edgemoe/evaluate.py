"""Perplexity of a model on a text: the measurement behind `edgemoe eval`, the
bundled-model report (edgemoe_lab/model_report.py) and bitwidth planning.

The text is tokenized as a whole (`Tokenizer.encode`, so the bundled texts' document
separators become the EOS token) and cut into non-overlapping windows of the model's
context; every token but the first is predicted exactly once, with the context reset at
each window start. Perplexity is exp(mean next-token negative log-likelihood).

Quality losses are *relative perplexity increases*: ppl / ppl_reference - 1, on the same
tokens, windows and compute dtype (`relative_loss`). Bitwidth plans use the same
definition on the calibration text, `edgemoe eval` comparisons on the held-out text.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import EdgeMoEError, InvalidArgument
from .utils import NLLSums


def windows(ids: list[int], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token list into non-overlapping windows of `context` inputs and their
    next-token targets, so that every token but the first is predicted exactly once
    (with the context reset at each window start)."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise EdgeMoEError(f"need more than {context} tokens to evaluate, got {len(ids)}")
    t = torch.tensor(ids[: n * context + 1], dtype=torch.long)
    return t[:-1].view(n, context), t[1:].view(n, context)  # (N, T), (N, T)


@torch.inference_mode()
def perplexity(model, ids: list[int], context: int, batch: int = 8, recorder=None, progress: bool = False,
               desc: str = "perplexity", per_window: bool = False) -> dict:
    """Mean next-token negative log-likelihood of `ids` under `model`, evaluated in
    windows of `context` tokens, `batch` windows per forward. Returns {"nll", "ppl",
    "tokens"} (and "window_nll", each window's mean NLL, with `per_window`: paired
    comparisons of two models need it); `recorder` (with `start(x)` and `finish()`, called
    around each batch: model_report.RoutingCounts) sees every window; `progress` draws a
    bar on stderr.

    An encoder-decoder model (Switch Transformers, NLLB-MoE) scores a target given a
    source: each window is split in half, source then target, and the result is the mean
    NLL per target token (edgemoe.seq2seq.text_pairs and pair_loss; "tokens" counts
    target tokens). Bitwidth planning measures these models with it."""
    if getattr(model, "is_encoder_decoder", False):
        from .seq2seq import pair_loss, text_pairs

        sources, targets = text_pairs(ids, context)
        return pair_loss(model, sources, targets, batch, progress, recorder, desc, per_window)
    inputs, targets = windows(ids, context)
    sums = NLLSums(per_window)
    bar = tqdm(total=inputs.numel(), unit="tok", desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(0, inputs.shape[0], batch):
        x, y = inputs[i : i + batch], targets[i : i + batch]  # (B, T) x2
        if recorder is not None:
            recorder.start(x)
        logits = model(x).float()  # (B, T, V)
        if recorder is not None:
            recorder.finish()
        sums.add(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape))  # (B, T)
        bar.update(y.numel())
    bar.close()
    return sums.result()


def check_decoder_only(model, what: str, source) -> None:
    """Refuse an encoder-decoder model (Switch Transformers, NLLB-MoE) for a tool that
    runs the model over text as one causal token stream (perplexity windows, calibration
    passes, teacher-forced traces): such a model scores a target given a source, which a
    plain text does not provide."""
    if getattr(model, "is_encoder_decoder", False):
        raise EdgeMoEError(f"{source}: {what} runs decoder-only models over one token stream; "
                           f"{model.args.model_type} is an encoder-decoder model (a target given a source), "
                           "which it does not support")


def relative_loss(ppl: float, reference_ppl: float) -> float:
    """Quality loss as used throughout edgemoe: the relative perplexity increase."""
    return ppl / reference_ppl - 1.0


def read_text(path: str | Path, what: str = "text") -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeMoEError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise EdgeMoEError(f"{path}: is a directory, expected a {what} file") from None
    except UnicodeDecodeError as e:
        raise EdgeMoEError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EdgeMoEError(f"{path}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise EdgeMoEError(f"{path}: the {what} file is empty")
    return text


def eval_tokens(tokenizer, text: str, context: int, max_tokens: int | None = None, source: str = "text") -> list[int]:
    """Token ids of `text` for perplexity windows of `context`, cut to `max_tokens`
    predicted tokens (rounded down to whole windows; None: all)."""
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        if max_tokens < context:
            raise InvalidArgument(f"the token limit {max_tokens} is below one window of the context ({context} tokens)")
        ids = ids[: max_tokens // context * context + 1]
    if len(ids) <= context:
        raise EdgeMoEError(f"{source}: {len(ids)} tokens, fewer than one window of the context "
                           f"({context + 1} tokens needed); give a longer text or a smaller --context")
    return ids


def checkpoint_expert_bytes(ckpt) -> int:
    """Bytes the routed experts take in a Hugging Face checkpoint as stored (their
    safetensors payload), from the file headers alone; the padding slots of a per-layer
    pruned model (copies never routed to, config edgemoe_experts_per_layer) not counted."""
    from .models.base import EXPERT_KEY
    from .store.tensorfile import read_header

    routable = ckpt.args.routable_experts() or {}
    total = 0
    for file in sorted({r.file for r in ckpt.refs}):
        infos, _ = read_header(file)
        for name, info in infos.items():
            meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
            for key, t in ckpt.sanitize(name, meta):
                m = EXPERT_KEY.match(key)
                if m and int(m.group(2)) < routable.get(int(m.group(1)), math.inf):
                    total += t.numel() * t.element_size()
    return total
