"""Several sequences generated together: slots that share decode forwards.

A decode step of one sequence reads every resident weight and its top-k experts to
compute one row; a step of B sequences reads the same resident weights once for B rows,
and each expert once for all the rows routed to it. Where the step is bound by memory
reads or by per-call overhead rather than by arithmetic, B rows cost little more than
one (edgemoe_lab/results/concurrent.md measures it).

`BatchScheduler` keeps `slots` KV caches (each of the context size, all counted in the
memory budget: runtime/loading.py memory_plan). Sequences are submitted to a queue; free
slots admit the oldest ones and prefill each prompt alone (in a slot whose cache already
holds the longest prefix of it, so a chat's next turn reuses its KV). Then every
admitted sequence takes part in each decode step: one forward over a batch whose row b
continues sequence b at its own position (models/rows.py), after which each row is
sampled with the sequence's own sampler and logits processors. A sequence that ends
(max_tokens, EOS, an error) or is cancelled (its consumer stopped reading: a stop
string, a client that left) frees its slot at once for the next one waiting.

The scheduler runs on a background thread (`start`: the server) or is driven by whoever
waits for a token (`generate_batch` in one thread). Either way only one thread computes
at a time (`model_lock`). A consumer reads its sequence's tokens through
`BatchSequence.tokens()`, exactly the items `generate.generate_step` yields, so
`generate.stream_generate` turns them into text, stop strings and statistics as for a
sequence run alone. Batched and alone give the same tokens up to the rounding of
batched matmuls (tests/models/test_batched_decode.py). bf16 models decode on
edgemoe.rowmm's kernel, one row or several, so that a sequence computes the same whatever
it shares its steps with (torch's own kernels round differently at one row and at four).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Iterator, Sequence

import torch

from . import rowmm
from .cpu import native_matmuls
from .errors import EdgeMoEError
from .generate import PromptCache, PromptLogitsHook, prefill, provider_of
from .models.attention import Attention
from .models.base import Transformer
from .models.mla import MLAttention
from .models.rows import row_caches
from .runtime.config import MAX_PARALLEL  # noqa: F401 (checked with the other options: runtime/config.py)
from .sample import LogitsProcessor, Sampler

log = logging.getLogger("edgemoe.batching")

POLL_S = 0.2  # how often a consumer waiting for a token runs its `abort` check
# Prompt tokens prefilled before a decode step (more when one prompt alone is longer):
# sequences arriving together start in the same step, and a burst of long prompts does not
# hold the running ones back for long.
PREFILL_BUDGET = 512


def supports_rows(model) -> bool:
    """Whether every layer of `model` takes RowCaches: its attention is edgemoe's Attention
    or MLAttention as such (a subclass with its own forward, or a recurrent mixer, does not)."""
    ok = (Attention.forward, MLAttention.forward)
    return all(getattr(type(layer.attn), "forward", None) in ok for layer in model.layers)


@torch.inference_mode()
def decode_rows(model: Transformer, tokens: Sequence[int], caches: Sequence[PromptCache], row_kernel: bool = True,
                rows_ok: bool | None = None) -> torch.Tensor:
    """One decode step of B sequences: tokens[b] continues the sequence in caches[b].
    Returns the next-token logits (B, V). B rows are one forward (models/rows.py) where
    every layer supports it (`rows_ok`, default supports_rows(model)), else B single-row
    forwards. bf16 matmuls run on edgemoe.rowmm's kernel (`row_kernel`, where it is
    available), whose cost hardly grows with the rows and whose every output row is
    computed the same way whatever the other rows: a sequence's tokens do not depend on
    what it is batched with (up to attention's sums over padded keys). One row is the
    single-sequence step on that kernel."""
    provider = provider_of(model)
    B = len(tokens)
    rows_ok = supports_rows(model) if rows_ok is None else rows_ok
    if B == 1 or not rows_ok:
        out = []
        for token, cache in zip(tokens, caches):
            if provider is not None:
                provider.begin_forward(1)
            with native_matmuls(), rowmm.active(row_kernel):
                out.append(model(torch.tensor([[token]]), cache.layers)[:, -1])  # (1, V)
        logits = torch.cat(out)  # (B, V)
    else:
        if provider is not None:
            provider.begin_forward(B)
        ids = torch.tensor(list(tokens), dtype=torch.long)[:, None]  # (B, 1)
        with native_matmuls(), rowmm.active(row_kernel):
            logits = model(ids, row_caches([c.layers for c in caches]))[:, -1]  # (B, V)
    for token, cache in zip(tokens, caches):
        cache.tokens.append(token)
    return logits


_DONE = object()


class SequenceStream:
    """The responses of a sequence queued on a scheduler (Engine.stream in batching mode):
    an iterator whose close() frees the slot even if it was never started."""

    def __init__(self, responses: Iterator, seq: "BatchSequence"):
        self.responses, self.seq = responses, seq

    def __iter__(self) -> "SequenceStream":
        return self

    def __next__(self):
        return next(self.responses)

    def close(self) -> None:
        close = getattr(self.responses, "close", None)
        if close is not None:
            close()
        self.seq.cancel()


class BatchSequence:
    """One sequence handed to a BatchScheduler: what to generate, and the queue of what it
    produced (read with `tokens`). Made by `BatchScheduler.submit`."""

    def __init__(self, scheduler: "BatchScheduler", ids: list[int], sampler: Sampler,
                 processors: Sequence[LogitsProcessor], max_tokens: int, logprobs: bool, stop_ids: frozenset,
                 prompt_logits: PromptLogitsHook | None):
        self.scheduler = scheduler
        self.ids, self.sampler, self.processors = ids, sampler, list(processors)
        self.max_tokens, self.logprobs, self.stop_ids = max_tokens, logprobs, stop_ids
        self.prompt_logits = prompt_logits
        self.context = list(ids)  # prompt and tokens fed so far (what logits processors see)
        self.cache: PromptCache | None = None  # the slot's cache while admitted
        self.capacity = 0  # the context size of the slot it ran in, and the positions it used
        self.positions = 0
        self.generated = 0
        self.last: int | None = None  # sampled, not yet fed to the model
        self.out: deque = deque()
        self.finished = False  # nothing more will be queued
        self.cancelled = False
        self.error: BaseException | None = None
        # Set whenever something is queued or the sequence ends. The consumer waits on its own
        # event: one shared condition would wake every consumer for every token, and they would
        # fight the scheduler thread for its lock (and the GIL) at each step.
        self.event = threading.Event()

    def tokens(self, abort: Callable[[], None] | None = None) -> Iterator:
        """Yield the sequence's tokens (or (token, log-probabilities (V,)) pairs with
        logprobs), as generate.generate_step does, waiting for each. `abort` is called
        every POLL_S seconds of waiting and may raise to give up (a client that left).
        Ending the iteration early (close) cancels the sequence and frees its slot."""
        try:
            while True:
                item = self.scheduler._next(self, abort)
                if item is _DONE:
                    return
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next step."""
        self.scheduler._cancel(self)

    def kv_stats(self) -> tuple[int, int]:
        """(context size, positions used) of the KV cache the sequence ran in."""
        return self.capacity, self.positions


class BatchScheduler:
    """Slots that decode their sequences together (see the module docstring).

    caches: one PromptCache per slot (their number is the batch size at most).
    onednn: prefill may use oneDNN (generate.prefill's flag). row_kernel: decode steps of
    several sequences use edgemoe.rowmm's kernel where it is available."""

    def __init__(self, model: Transformer, caches: Sequence[PromptCache], onednn: bool = True,
                 row_kernel: bool = True, prefill_chunk: int = 512):
        if not caches:
            raise ValueError("a scheduler needs at least one slot")
        self.model = model
        self.caches = list(caches)
        self.free: list[PromptCache] = list(caches)
        self.onednn, self.row_kernel, self.prefill_chunk = onednn, row_kernel, prefill_chunk
        self.rows_ok = supports_rows(model)
        self.waiting: deque[BatchSequence] = deque()
        self.active: list[BatchSequence] = []
        self.cond = threading.Condition()  # guards the queues and every sequence's state; the thread waits on it
        self.model_lock = threading.RLock()  # held while the model computes
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.closed = False  # close(): nothing runs any more
        self.prefills = 0  # sequences prefilled
        self.steps = 0  # decode steps run, and rows decoded in them (batch occupancy = rows / steps)
        self.rows = 0

    @property
    def slots(self) -> int:
        return len(self.caches)

    # -- submitting and consuming

    def submit(self, ids: Sequence[int], sampler: Sampler, processors: Sequence[LogitsProcessor] = (),
               max_tokens: int = 256, logprobs: bool = False, stop_ids: Sequence[int] = (),
               prompt_logits: PromptLogitsHook | None = None) -> BatchSequence:
        """Queue a sequence. It generates up to max_tokens tokens and stops after one in
        stop_ids (the EOS ids, or none with ignore_eos). Options are not checked here:
        Engine.stream checks them. Thread-safe."""
        seq = BatchSequence(self, list(ids), sampler, processors, max_tokens, logprobs, frozenset(stop_ids),
                            prompt_logits)
        with self.cond:
            if self.closed:
                raise EdgeMoEError("the engine is closed")
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def _next(self, seq: BatchSequence, abort: Callable[[], None] | None):
        """The next item of seq's queue (_DONE at the end), waiting for it: on the running
        background thread, or by running steps here when there is none."""
        while True:
            if seq.out:  # deque appends and pops are atomic: no lock to read the queue
                return seq.out.popleft()
            if seq.finished:  # set after the last item was queued
                if seq.out:
                    continue
                with self.cond:
                    error, seq.error = seq.error, None
                if error is not None:
                    raise error
                return _DONE
            with self.cond:
                closed, threaded = self.closed, self._thread is not None
                if closed:  # closed while this sequence waited: it ends here, with close()'s error
                    seq.cancelled = seq.finished = True
                    error, seq.error = seq.error, None
            if closed:
                if error is not None:
                    raise error
                return _DONE
            if threaded:
                if seq.event.wait(POLL_S):
                    seq.event.clear()  # cleared before the queue is looked at again: no wake-up is lost
                    continue
            else:
                self.step()
            if abort is not None:
                abort()

    def _cancel(self, seq: BatchSequence) -> None:
        with self.cond:
            if not seq.finished:
                seq.cancelled = True
                self.cond.notify()

    # -- the background thread

    def start(self) -> None:
        """Run steps on a background thread until `stop` (idempotent)."""
        with self.cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="edgemoe-batch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step, cancelling every sequence
        (their consumers get what was produced, then the end)."""
        with self.cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            for seq in list(self.waiting) + self.active:
                seq.cancelled = True
            self.cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self.model_lock, self.cond:
            self._reap()

    def close(self) -> None:
        """Stop for good (Engine.close): every sequence ends, and none can be submitted."""
        with self.cond:
            self.closed = True
            for seq in list(self.waiting) + self.active:  # their consumers get what was made, then this
                if not seq.finished and seq.error is None:
                    seq.error = EdgeMoEError("the engine was closed before this sequence finished")
        self.stop()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stopping and not self._has_work():
                    self.cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # step reports errors to the sequences; this is a bug in the scheduler itself
                log.exception("batch scheduler step failed")

    def _has_work(self) -> bool:
        return bool(self.active) or (bool(self.waiting) and bool(self.free)) or any(s.cancelled for s in self.waiting)

    # -- one step

    def step(self) -> bool:
        """Admit and prefill waiting sequences (each alone, while slots are free and their
        prompts total at most PREFILL_BUDGET tokens; at least one), then run one decode
        step of every admitted sequence. Returns whether anything ran."""
        with self.model_lock:
            admitted, budget = 0, PREFILL_BUDGET
            while True:
                with self.cond:
                    self._reap()
                    if admitted and self.waiting and len(self.waiting[0].ids) > budget:
                        break  # the active sequences have waited long enough for this step
                    seq = self._admit()
                if seq is None:
                    break
                admitted += 1
                budget -= len(seq.ids)
                self._prefill(seq)
            with self.cond:
                self._reap()
                batch = [s for s in self.active if s.last is not None]
            if batch:
                self._decode(batch)
            return admitted > 0 or bool(batch)

    def _reap(self) -> None:
        """Free the slots of cancelled sequences and drop cancelled ones still waiting (cond held)."""
        for seq in [s for s in self.active if s.cancelled]:
            self._release(seq)
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.finished = True
            seq.event.set()

    def _admit(self) -> BatchSequence | None:
        """The oldest waiting sequence, given the free slot whose cache shares the longest
        prefix with its prompt (cond held)."""
        if not self.waiting or not self.free:
            return None
        seq = self.waiting.popleft()
        best = max(range(len(self.free)), key=lambda i: (_common_prefix(self.free[i].tokens, seq.ids), -i))
        seq.cache = self.free.pop(best)
        seq.capacity = seq.cache.capacity or 0
        self.active.append(seq)
        return seq

    def _release(self, seq: BatchSequence, clear: bool = False) -> None:
        """seq is over: its slot goes back to the free list (cond held). `clear` forgets what
        the cache holds (after an error it may hold part of a step)."""
        if seq in self.active:
            self.active.remove(seq)
        if seq.cache is not None:
            seq.positions = seq.cache.layers[0].offset if seq.cache.layers else 0
            if clear:
                seq.cache.clear()
            self.free.append(seq.cache)
            seq.cache = None
        seq.finished = True
        seq.last = None
        seq.event.set()

    def _fail(self, seq: BatchSequence, error: BaseException) -> None:
        with self.cond:
            seq.error = error
            self._release(seq, clear=True)

    def _prefill(self, seq: BatchSequence) -> None:
        self.prefills += 1
        try:
            logits = prefill(self.model, seq.ids, seq.cache, self.prefill_chunk, self.onednn, seq.prompt_logits)
        except BaseException as e:  # KeyboardInterrupt too: the cache may hold part of a forward
            self._fail(seq, e)
            if not isinstance(e, Exception):
                raise
            return
        if seq.max_tokens == 0:  # the prompt was only scored
            with self.cond:
                self._release(seq)
            return
        self._sample(seq, logits[0, -1])

    def _decode(self, batch: list[BatchSequence]) -> None:
        try:
            logits = decode_rows(self.model, [s.last for s in batch], [s.cache for s in batch],
                                 self.row_kernel, self.rows_ok)  # (B, V)
        except BaseException as e:  # a model or store error: every row of the step shares it
            for seq in batch:
                self._fail(seq, e)
            if not isinstance(e, Exception):
                raise
            return
        self.steps += 1
        self.rows += len(batch)
        for b, seq in enumerate(batch):
            seq.context.append(seq.last)
            self._sample(seq, logits[b])

    def _sample(self, seq: BatchSequence, logits: torch.Tensor) -> None:
        """Sample seq's next token from its logits (V,), as generate_step does, and queue it."""
        try:
            raw = logits.float()
            scores = raw
            for proc in seq.processors:
                scores = proc(seq.context, scores)
            token = seq.sampler(scores)
            item = (token, torch.log_softmax(raw, -1)) if seq.logprobs else token
        except Exception as e:
            self._fail(seq, e)
            return
        with self.cond:
            seq.generated += 1
            seq.out.append(item)
            if seq.generated >= seq.max_tokens or token in seq.stop_ids or seq.cancelled:
                self._release(seq)
            else:
                seq.last = token
        seq.event.set()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b) - 1)  # PromptCache.reuse leaves at least one token to prefill
    while n < limit and a[n] == b[n]:
        n += 1
    return n
