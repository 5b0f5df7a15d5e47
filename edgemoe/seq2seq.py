"""Text-to-text generation with encoder-decoder MoE models (Switch Transformers, NLLB-MoE;
models/seq2seq_blocks.py).

The source is encoded once: one forward through the encoder stack (its MoE layers see
the whole source as one batch, as a prefill does, and expert capacity counts it whole),
after which every decoder layer's cross-attention keys and values are computed once and
kept in the cache. The decoder then runs token by token with a self-attention KV cache,
like `generate.generate_step`, sampling with edgemoe.sample's samplers and logits
processors. Every forward (the encoder's, each decoder step) tells the expert provider
that it begins, so offloading, the expert cache, prediction and preloading serve both
stacks; the decoder's MoE layers have ids after the encoder's.

`score` gives the teacher-forced log-likelihood of a target (a seq2seq loss; `text_pairs`
and `pair_loss` compute it over a text cut into source/target windows: `edgemoe eval`), and
`Seq2SeqTraceRecorder` records routing traces of runs in which each forward covers one
stack.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .cpu import native_matmuls
from .errors import ContextLengthError, InvalidArgument
from .generate import decode_loop, provider_of
from .models.seq2seq_blocks import Seq2SeqCache, Seq2SeqModel
from .runtime.trace import TraceRecorder
from .sample import LogitsProcessor, Sampler, make_sampler
from .utils import NLLSums


def is_seq2seq(model) -> bool:
    """Whether `model` is an encoder-decoder (generated with this module, not generate.py)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def _check_ids(model: Seq2SeqModel, ids: Sequence[int], what: str) -> list[int]:
    ids = list(ids)
    if not ids:
        raise InvalidArgument(f"the {what} must contain at least one token")
    V = model.args.vocab_size
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
    if bad:
        raise InvalidArgument(f"{what} token id {bad[0]!r} is outside the vocabulary (0..{V - 1})")
    return ids


@torch.inference_mode()
def encode(model: Seq2SeqModel, source: Sequence[int], cache: Seq2SeqCache, onednn: bool = True) -> torch.Tensor:
    """Run the encoder once on `source` and start `cache` on its output (cross-attention
    K/V of every decoder layer, no target positions). Returns the encoder output (1, S, H).
    A source longer than the cache's capacity raises ContextLengthError."""
    source = _check_ids(model, source, "source")
    if cache.capacity is not None and len(source) > cache.capacity:
        raise ContextLengthError(f"the source has {len(source)} tokens, more than the context size of "
                                 f"{cache.capacity} (--ctx-size / ctx_size)")
    provider = provider_of(model)
    if provider is not None:
        provider.begin_forward(len(source))
    with native_matmuls(not onednn):
        memory = model.encode(torch.tensor([source]))  # (1, S, H)
    model.start(cache, memory)
    return memory


@torch.inference_mode()
def generate_step(
    model: Seq2SeqModel,
    source: Sequence[int],
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    cache: Seq2SeqCache | None = None,
    decoder_prompt: Sequence[int] | None = None,
    onednn: bool = True,
    logprobs: bool = False,
    forced: Sequence[int] = (),
) -> Iterator[int] | Iterator[tuple[int, torch.Tensor]]:
    """Yield up to `max_tokens` sampled target token ids for `source`.

    The target starts with `decoder_prompt` (default: the config's decoder start token),
    read in one forward, then the `forced` tokens, each read in a forward of its own as
    transformers' generate reads its forced_bos_token_id (NLLB translation forces the
    target language code; expert capacity counts each forward's tokens, so the two are
    not the same); logits processors see the target so far as their context. As in generate.generate_step, the next forward
    runs only when the next token is asked for; decode steps use torch's native matmuls,
    the encoder oneDNN where available unless `onednn` is False. logprobs: yield (token,
    log-probabilities (V,)) pairs, the model's distribution before processors and sampling.
    """
    sampler = sampler or make_sampler(0.0)
    cache = cache if cache is not None else model.make_cache()
    start = model.args.decoder_start_token_id
    target = _check_ids(model, [start] if decoder_prompt is None else decoder_prompt, "decoder prompt")
    forced = _check_ids(model, forced, "forced target") if forced else []
    encode(model, source, cache, onednn)
    provider = provider_of(model)
    if provider is not None:
        provider.begin_forward(len(target))
    with native_matmuls(len(target) == 1 or not onednn):
        logits = model.decode(torch.tensor([target]), cache, last_only=True)  # (1, 1, V)

    def step(token: int) -> torch.Tensor:
        if provider is not None:
            provider.begin_forward(1)
        with native_matmuls():
            return model.decode(torch.tensor([[token]]), cache)  # (1, 1, V)

    for token in forced:
        logits = step(token)  # (1, 1, V)
        target.append(token)
    yield from decode_loop(logits, target, step, sampler, logits_processors, max_tokens, logprobs)


def generate(model: Seq2SeqModel, source: Sequence[int], max_tokens: int = 256, ignore_eos: bool = False,
             **kwargs) -> list[int]:
    """The target token ids for `source` (generate_step's options), stopping after the
    first EOS unless `ignore_eos`."""
    eos = set(model.args.eos_ids)
    out = []
    for token in generate_step(model, source, max_tokens=max_tokens, **kwargs):
        out.append(token)
        if token in eos and not ignore_eos:
            break
    return out


@torch.inference_mode()
def score(model: Seq2SeqModel, source: Sequence[int], target: Sequence[int], onednn: bool = True) -> tuple[float, int]:
    """Teacher-forced negative log-likelihood (nats, summed) of `target` given `source`,
    and the number of target tokens: the decoder reads [decoder start] + target[:-1] in
    one forward, as transformers computes a seq2seq loss from labels."""
    target = _check_ids(model, target, "target")
    cache = model.make_cache()
    encode(model, source, cache, onednn)
    inputs = [model.args.decoder_start_token_id] + target[:-1]
    provider = provider_of(model)
    if provider is not None:
        provider.begin_forward(len(inputs))
    with native_matmuls(not onednn):
        logits = model.decode(torch.tensor([inputs]), cache)[0].float()  # (T, V)
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None]).sum()
    return float(nll), len(target)


def text_pairs(ids: Sequence[int], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream as (source, target) pairs for a seq2seq loss: consecutive
    non-overlapping windows of `context` tokens, each split in half: the first
    context // 2 tokens are the source, the remaining ones the target. Returns sources
    (N, context // 2) and targets (N, context - context // 2)."""
    if context < 2:
        raise InvalidArgument(f"a source/target window needs at least 2 tokens, got a context of {context}")
    n = len(ids) // context
    if n < 1:
        raise InvalidArgument(f"need at least {context} tokens for one source/target window, got {len(ids)}")
    w = torch.tensor(list(ids[: n * context]), dtype=torch.long).view(n, context)  # (N, C)
    return w[:, : context // 2], w[:, context // 2 :]  # (N, S), (N, T)


@torch.inference_mode()
def pair_loss(model: Seq2SeqModel, sources: torch.Tensor, targets: torch.Tensor, batch: int = 8,
              progress: bool = False, recorder=None, desc: str = "seq2seq loss", per_window: bool = False) -> dict:
    """Teacher-forced seq2seq loss of each target given its source (as `score`, `batch`
    pairs per forward: expert capacity counts each sequence alone): {"nll" (mean per
    target token), "ppl", "tokens"} (and "window_nll", each pair's mean, with
    `per_window`), what evaluate.perplexity returns. `recorder` (start(x), finish()) sees
    each batch."""
    from tqdm import tqdm

    provider = provider_of(model)
    start = model.args.decoder_start_token_id
    sums = NLLSums(per_window)
    bar = tqdm(total=targets.numel(), unit="tok", desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(0, sources.shape[0], batch):
        src, tgt = sources[i : i + batch], targets[i : i + batch]  # (B, S), (B, T)
        inputs = torch.cat([torch.full_like(tgt[:, :1], start), tgt[:, :-1]], dim=1)  # (B, T): shifted right
        if recorder is not None:
            recorder.start(src)
        if provider is not None:
            provider.begin_forward(src.numel())
        memory = model.encode(src)  # (B, S, H)
        if provider is not None:
            provider.begin_forward(inputs.numel())
        logits = model.decode(inputs, memory=memory).float()  # (B, T, V)
        if recorder is not None:
            recorder.finish()
        sums.add(-torch.log_softmax(logits, -1).gather(2, tgt[..., None])[..., 0])  # (B, T)
        bar.update(tgt.numel())
    bar.close()
    return sums.result()


class Seq2SeqTraceRecorder(TraceRecorder):
    """A routing trace of an encoder-decoder run (runtime/trace.py's format). Each forward
    covers one stack: the encoder's MoE positions, or the decoder's. A trace row still
    holds every MoE position, so the rows of an encoder forward hold -1 (no expert, as a
    dropped slot) at the decoder's positions and those of a decoder forward -1 at the
    encoder's; slots over an expert's capacity are -1 too. Gate look-ahead logits
    (`lookahead`) are recorded within a stack only (zeros past its last MoE layer and in
    the skipped rows). The header's "encoder_moe_layers" is the number of encoder MoE
    positions: fitting and evaluating predictors (runtime/fit.py) count only the rows in
    which a position routed."""

    def __init__(self, model: Seq2SeqModel, lookahead: int = 0):
        super().__init__(model, lookahead)
        # The decoder's first MoE position (encoder layer ids come first, below num_hidden_layers).
        self.split = sum(1 for layer in self.layers if layer < model.args.num_hidden_layers)

    def _skip(self, positions: range, n: int) -> None:
        none = torch.full((n, self.top_k), -1, dtype=torch.long)
        for j in positions:
            super().on_route(j, none, torch.zeros(n, self.top_k), None)
            if self.depth:
                self.look[j][-1][:] = 0  # (n, D, E): this stack did not run

    def on_route(self, i: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
        n, L = ids.shape[0], len(self.layers)
        if i == self.split and i > 0:  # a decoder forward begins: its rows skipped the encoder
            self._skip(range(0, self.split), n)
        super().on_route(i, ids, weights, logits)
        if self.depth and i < self.split:  # an encoder position looks ahead within the encoder only
            self.look[i][-1][:, max(0, self.split - i - 1):] = 0  # (n, D, E)
        if i == self.split - 1:  # an encoder forward ends: its rows skip the decoder
            self._skip(range(self.split, L), n)


    def trace(self):
        t = super().trace()
        t.header["encoder_moe_layers"] = self.split
        return t


def trace_rows(trace, stack: str, split: int) -> np.ndarray:
    """The (T, L_stack, k) ids of one stack ("encoder" or "decoder") from a trace recorded
    with Seq2SeqTraceRecorder: the rows of that stack's forwards (a forward belongs to the
    stack whose positions it routed: capacity drops only ever part of one), its positions
    only."""
    cols = slice(None, split) if stack == "encoder" else slice(split, None)
    out, row = [], 0
    for n in trace.forward_tokens.tolist():
        block = trace.ids[row : row + n, cols]  # (n, L_stack, k)
        if (block >= 0).any():
            out.append(block)
        row += n
    return np.concatenate(out) if out else trace.ids[:0, cols]
