"""What pruning and merging measure on calibration text: how much each expert
contributes, and how alike experts of one layer behave.

One pass runs the model in RAM over calibration windows. For each MoE layer and expert
it accumulates

    frequency(e)  = share of tokens routed to e (any of the top-k slots)
    importance(e) = (1 / N) * sum over tokens t routed to e of  w_t,e * ||E_e(x_t)||
                    (or ||E_e(w_t,e * x_t)|| for routers that scale the experts' inputs)

importance is the mean magnitude of what the expert adds to the layer's output per
token: it combines how often an expert is used with how much it changes the output
when it is (an output-sensitivity score in the spirit of the expert-importance measures
surveyed in the Edge-MoE survey; pruning the least important removes the least output).
It also keeps a fixed sample of each layer's expert inputs, on which merging compares
experts' outputs (output-space similarity). Inputs and weights come from the blocks' expert
hook (`MoEBlock.expert_hook`): x_t is what the experts receive, which is not always the
block's input (Gemma 4 runs its experts on a norm of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_hf
from ..evaluate import check_decoder_only, eval_tokens, read_text, windows
from ..tokenizer import Tokenizer


@dataclass
class LayerStats:
    frequency: torch.Tensor  # (E,) share of tokens routed to each expert
    importance: torch.Tensor  # (E,) mean w * ||E(x)|| per token
    sample: torch.Tensor  # (S, H) expert inputs for output comparisons


@dataclass
class ExpertStats:
    layers: dict[int, LayerStats]  # MoE layer -> stats
    tokens: int


@torch.inference_mode()
def measure(model, ids: list[int], context: int, sample: int = 256, batch: int = 4) -> ExpertStats:
    """Run `model` (in RAM, InRAMProvider) over `ids` in windows of `context` tokens."""
    blocks = list(model.moe_blocks())
    table = blocks[0].provider.table
    E = blocks[0].num_experts
    count = {b.layer: torch.zeros(E, dtype=torch.float64) for b in blocks}
    imp = {b.layer: torch.zeros(E, dtype=torch.float64) for b in blocks}
    kept: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    on_input = {b.layer: b.router.scales_input for b in blocks}

    def hook(layer, x, weights, ids_, out):
        for e in ids_.unique().tolist():
            if e < 0:
                continue
            rows, slots = (ids_ == e).nonzero(as_tuple=True)
            w = weights[rows, slots]  # (n,)
            if on_input[layer]:  # the block weights the expert's input, as here
                norm = table[(layer, e)](x[rows] * w[:, None]).double().norm(dim=-1)  # (n,)
            else:
                norm = w.double() * table[(layer, e)](x[rows]).double().norm(dim=-1)  # (n,)
            count[layer][e] += len(rows)
            imp[layer][e] += norm.sum()
        have = sum(len(s) for s in kept[layer])
        if have < sample:
            kept[layer].append(x[: sample - have].clone())

    for b in blocks:
        b.expert_hook = hook
    total = 0
    try:
        inputs_, _ = windows(ids, context)
        for i in range(0, inputs_.shape[0], batch):
            x = inputs_[i : i + batch]  # (B, T)
            model(x)
            total += x.numel()
    finally:
        for b in blocks:
            b.expert_hook = None
    layers = {layer: LayerStats((count[layer] / total).float(), (imp[layer] / total).float(),
                                torch.cat(kept[layer])) for layer in count}
    return ExpertStats(layers, total)


def calibration(path: str | Path, calib: str | Path | None, max_tokens: int, context: int | None = None):
    """(model in RAM, checkpoint, token ids, context) for a Hugging Face directory."""
    from ..assets import CALIB_TEXT

    model, ckpt = load_hf(path, "float32")
    check_decoder_only(model, "pruning and merging", path)
    ctx = context or min(512, model.args.max_position_embeddings)
    text = read_text(calib or CALIB_TEXT, "calibration text")
    tok = Tokenizer(Path(path), eos_token_ids=model.args.eos_ids)
    return model, ckpt, eval_tokens(tok, text, ctx, max_tokens, source=str(calib or "calibration text")), ctx
