"""`OffloadedProvider`: the ExpertProvider that serves MoE blocks from the expert cache,
and preloads the experts that later layers are predicted to use.

Serving a layer. For one layer's request it pins the experts that are already cached (so
that loading the others cannot evict them), yields those first, then yields the misses in
order. With read-ahead (the default; RuntimeConfig.read_ahead) a layer that misses
experts and has more than one to compute hands its misses to the cache at once
(`ExpertCache.read_ahead`): room for them is reserved then, in this thread, so the cache
evolves the same whatever the threads' timing, and the loader reads them one after
another, ahead of any prefetch, while this thread computes with the experts it already
has. Only the last miss's compute then follows its read (bench model in a 25 % cgroup:
prefill 1.4x, decode 1.04x; edgemoe_lab/results/huge_pages.md). A miss that found no room,
or that the loader has not started when its turn comes, is read in the calling thread,
as every miss is without read-ahead. Each expert is leased while the block computes with
it and released when the next one is requested, so a prefill that needs more distinct
experts than the cache holds simply reuses the room of experts it has finished with; the
slab is never exceeded.

Preloading (the EdgeMoE pipeline). When MoE layer i has routed, before its experts
compute, the provider asks the predictor (edgemoe.runtime.predict) to rank the experts of
later layers and submits those worth reading as PREFETCH loads to the cache's background
loader, earlier deadlines and likelier experts first. They read while layer i computes.
What is worth reading (prefetch.py has the knobs):

- Confidence. Only experts of the predictor's top N (prefetch_experts) whose predicted
  probability of use is at least the threshold. A prefetch is not free: the loader
  thread competes with the compute thread for the CPU and the interpreter lock (on a
  busy 2-core machine a bare background pread of one bundled-model expert slowed the
  compute thread by 0.1-0.2 ms, a third to a half of a demand read). So by default the
  threshold is the break-even probability, measured online in decode: the cost of one
  background read (how much longer a layer computes per background read that finished
  during it, against layers during which none did: running averages) over the stall of
  one demand read; never below prefetch.AUTO_FLOOR. When it exceeds 1 nothing is read,
  and the cost estimate decays so that reading resumes, and is measured again, later.
- Pacing (on by default). A prefetch pays only if it arrives before its layer asks for
  it; one still on the wire then makes the demand wait, and one not needed cost link
  time and evicted something. The provider measures the per-layer compute time of each
  phase (time between two layer requests less the stall in between, a running average)
  and the cache the link's read rate. Reads for layer i+d can then use
  rate x d x layer time bytes of link time, less what earlier prefetches still have to
  read. Each layer predicts one target: the nearest layer i+d whose window holds at
  least one expert, so when layers are short (or the link slow) it looks further ahead,
  up to `layers` (default 3), and otherwise only at the next layer (the next layer
  predicts the one after with fresher inputs, and predicting costs compute time too).
  Its experts are admitted, likeliest first, while they fit the window. When even the
  furthest window holds nothing, it neither predicts nor reads: preloading costs nothing
  where it cannot pay (a slow SD card, where one expert takes longer to read than
  several layers take to compute).
- Revision. A target predicted again (from a nearer layer, when the window changed) with
  fresher inputs cancels its queued prefetches that the new prediction no longer admits.
- Demand first. A decode layer with misses holds the link (`hold_background`) from its
  request until its last miss is read, so no prefetch starts or continues meanwhile
  (cache.py); a prefetch delays a demand read by at most one chunk already on the wire.

Without pacing, every admitted expert of the next `layers` (default 1) layers is queued,
which with threshold 0 is the preloading this runtime had before (kept for comparison).

Measured, not assumed. With the automatic threshold and pacing, each decode forward asks
`prefetch.DecodeSwitch` whether to predict and preload at all: predicting costs every
layer compute time (on the bundled model, a decode token with predictions and no reads
ran 0.87-0.90x as fast), which a fast disk or a cache holding most experts leaves no stall
to pay back. A forward that does not preload skips the measurements and settling too.

What a queued or running prefetch may do:

- Protection. The experts predicted for a later layer (cached or prefetched) are guarded
  until that layer's request: no prefetch evicts them, and a demand load takes them only
  when nothing else can go. The current layer's needed experts are pinned, so prefetch
  never evicts what the current or next layer is expected to use.
- Priority. A needed expert that was not predicted is read on demand in the compute
  thread; it never queues behind prefetches, and under a read throttle demand reads take
  bandwidth first. A needed expert that a prefetch is still reading is waited for (a
  late arrival), and that read is promoted to demand priority.
- Dropping. When layer j's request comes, prefetches for j that are still queued are
  cancelled (needed ones are then read on demand) and unneeded ones still reading are
  aborted at their next chunk; a new forward drops everything left of the last one.
- Errors. A background load that fails (I/O error, checksum mismatch) raises its error
  in the compute thread at the next layer request; a prefetch that found no room it was
  allowed to take (CacheFull) is only counted.

Cache-aware routing (models/routers.py, `cache_route`) asks `resident(layer)` which
experts are in memory, and reports each routing through `note_cache_routing`; the
statistics count the routed slots it swapped.

Statistics separate prefill from decode (the paper's numbers are decode numbers):
prefetch hits (needed experts present because a prefetch read them), late arrivals,
wasted prefetch bytes (read for a layer that did not use them), stall seconds per token
and the online recall/precision of the predictor's top-N.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Iterator, Sequence

import time

import numpy as np
import torch

from ..models.moe import Expert, ExpertProvider
from ..store.reader import ReadAborted
from ..utils import peak_rss_bytes
from .cache import PREFETCH, CacheFull, ExpertCache, LoadFuture
from .fallback import largest_shares
from .prefetch import AUTO_FLOOR, AUTO_START, DecodeSwitch, PrefetchConfig
from .stats import CacheRouting, ExpertReads, FallbackReads, MemoryUse, OffloadStats, PrefetchActivity, PrefetchStats

# Counters kept per phase (prefill / decode).
_COUNTERS = ("hits", "misses", "bytes", "stall_s", "pf_hits", "pf_late", "pf_wasted_bytes", "pf_bytes",
             "pred_hits", "pred_needed", "pred_predicted", "cr_slots", "cr_swapped", "fb_reads")
LAYER_TIME_WEIGHT = 0.2  # weight of the newest sample in the per-layer compute time's running average
COST_WEIGHT = 0.03  # the same for the break-even estimates (noisier samples, slower averages)
COST_DECAY = 0.98  # per layer that read nothing because of the threshold: the read cost estimate shrinks


@dataclass(eq=False)
class _Prefetch:
    key: tuple[int, int]
    target: int  # MoE position it was predicted for
    future: LoadFuture
    length: int
    phase: str
    needed: bool | None = None  # settled: did the target layer use it?
    discard: bool = False  # its forward failed: ignore the outcome


class OffloadedProvider(ExpertProvider):
    """Serves MoE blocks from an ExpertCache and preloads what later layers are predicted
    to use (see the module notes). It speaks to the cache only through its public
    operations."""

    def __init__(self, cache: ExpertCache, info: dict, moe_layers: Sequence[int] | None = None,
                 prefetch: PrefetchConfig | None = None, read_ahead: bool = True):
        self.cache = cache
        self.info = info  # static facts for the statistics: mode, policy, budget, resident bytes, baseline RSS
        self.layers = list(moe_layers) if moe_layers is not None else list(cache.args.moe_layers())
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        self.L = len(self.layers)
        self.top_k = cache.args.top_k
        self.num_experts = cache.args.experts_per_layer
        self.prefetch = prefetch or PrefetchConfig(enabled=False, reason="off")
        self.n_prefetch = self.prefetch.experts or self.top_k + 1
        self.forwards_started = 0
        self._base = 0  # request number of this forward's first MoE layer
        self._rows: dict[int, np.ndarray] = {}  # position -> (N, k) expert ids of this forward
        self._records: dict[tuple[int, int], _Prefetch] = {}  # prefetches not yet settled
        self._retired: list[_Prefetch] = []  # settled, still reading
        self._predicted: dict[int, list[int]] = {}  # position -> top-N predicted at distance 1
        self._layer_s: dict[str, float] = {}  # phase -> compute seconds per MoE layer (running average)
        self._clock: tuple | None = None  # (position, time, cache counters) at the last request
        self._idle_s: float | None = None  # decode layer compute time with no background read finishing
        self._read_cost: float | None = None  # compute seconds one background read costs
        self._miss_s: float | None = None  # stall seconds of one demand read
        self._blob_min = 0  # the smallest expert blob: a window smaller than this admits nothing
        self._fb: ExpertCache | None = None  # the small copies' cache (use_fallback)
        self._fb_below = 0.0
        self._weights: tuple[int, torch.Tensor] | None = None  # (layer, (N, k) routing weights) of the next request
        self.read_ahead = read_ahead
        self._switch = DecodeSwitch() if self.prefetch.active and self.prefetch.switched else None
        self._preload = self.prefetch.active  # whether this forward predicts and preloads (the switch's call)
        self.reset_stats()

    # ----------------------------------------------------------------- forwards

    def begin_forward(self, num_tokens: int) -> None:
        self._drop_all(discard=False)
        self._poll_retired()
        self._base = self.forwards_started * max(self.L, 1)
        self.cache.begin_forward(num_tokens, self._base)  # guards of the last forward lapse
        self.forwards_started += 1
        self._rows.clear()
        self._predicted.clear()
        self._clock = None  # layer times are measured within one forward
        self._account()
        self._phase = "decode" if num_tokens == 1 else "prefill"
        if self._switch is not None:
            if num_tokens == 1:
                self._preload = self._switch.decode(time.perf_counter())
            else:
                self._switch.other()
                self._preload = True
        self.tokens += num_tokens
        self.forwards += 1
        if num_tokens == 1:
            self.decode_forwards += 1

    def _account(self) -> None:
        """Add the cache counters' growth since the last forward began to the phase
        (prefill or decode) that forward belonged to."""
        c = self._counters()
        now = (c.hits, c.misses, c.bytes_read, c.stall_s)
        acc = self._phases[self._phase]
        for name, a, b in zip(_COUNTERS[:4], now, self._mark):
            acc[name] += a - b
        self._mark = now

    def _counters(self):
        """The cache's counters, with the small copies' bytes and stall added (their reads
        stall the compute thread too)."""
        c = self.cache.counters()
        if self._fb is not None:
            f = self._fb.counters()
            c = c._replace(bytes_read=c.bytes_read + f.bytes_read, stall_s=c.stall_s + f.stall_s)
        return c

    # ----------------------------------------------------------------- serving a layer

    def experts(self, layer: int, ids: Sequence[int], x: torch.Tensor,
                rows: torch.Tensor | None = None) -> Iterator[tuple[int, Expert]]:
        cache = self.cache
        # Experts that share a blob (merged groups) are requested, cached and read once.
        blob = {int(e): cache.blob_key((layer, int(e))) for e in ids}
        keys = list(dict.fromkeys(blob.values()))
        if cache.holds_all() and not (self._records or self._retired):
            # Every blob is cached and none can be evicted (nothing is ever read again): no
            # pins, prefetch or settling, one lock for the layer's leases (hits as before).
            entries = cache.lease_cached(keys)
            try:
                for e, key in blob.items():
                    yield e, cache.expert(entries[key])
            finally:
                cache.release_all(entries.values())
            return
        pos = self.pos.get(layer, 0)
        active = self._preload  # this forward predicts and preloads (off without preloading)
        if active and (self.prefetch.pacing or self.prefetch.threshold is None):
            self._tick(pos)  # what pacing and the automatic threshold measure
        try:
            self._poll_retired()
        except BaseException:
            self._drop_all(discard=True)
            raise
        pinned = cache.request(layer, keys, self._base + pos)  # the cached ones, pinned
        present = set(pinned)
        # Misses of experts with a small routing weight: read their small copies (fallback.py).
        low = self._low(layer, blob, present, rows) if self._fb is not None and len(present) < len(keys) else ()
        # Demand first: a decode layer with misses keeps background reads off the link
        # until its last miss is read (in prefill, expert compute between misses is long
        # enough to be worth the link; there each miss pauses them only while it reads).
        hold = active and x.shape[0] == 1 and len(present) < len(keys)
        if hold:
            cache.hold_background()
        # Read ahead: the loader reads the misses one after another while this thread
        # computes the experts it has, so only the last read's compute is not overlapped.
        misses = [k for k in keys if k not in present and k not in low]
        ahead: set = set()
        if self.read_ahead and misses and len(misses) + len(present) > 1:
            ahead = set(cache.read_ahead(misses))  # each pinned once until its acquire
        try:
            if active or self._records:
                self._settle(pos, set(keys), {(layer, e) for e in blob})
            if active:
                self._prefetch(pos, ids, x, rows)
        except BaseException:
            cache.unpin(pinned + list(ahead))
            if hold:
                cache.release_background()
            self._drop_all(discard=True)
            raise
        order = pinned + [k for k in keys if k not in present]  # cached experts first
        users: dict = {}
        for e, k in blob.items():
            users.setdefault(k, []).append(e)
        ok = False
        try:
            for n, key in enumerate(order):
                src = self._fb if key in low else cache
                entry, hit = src.acquire(key)
                if key in ahead:  # leased now: its read-ahead pin can go
                    ahead.discard(key)
                    cache.unpin([key])
                if key in low:
                    self.fb_uses += 1
                    if not hit:
                        self.fb_saved += cache.blob_bytes(key) - entry.length
                        self._phases[self._phase]["fb_reads"] += 1
                if hold and n == len(order) - 1:  # every miss is in: the link is free for prefetches
                    hold = False
                    cache.release_background()
                if key in present:  # the lease protects it from here on
                    cache.unpin([key])
                    present.discard(key)
                try:
                    expert = src.expert(entry)
                    for e in users[key]:
                        yield e, expert
                finally:
                    src.release(entry)
            ok = True
        finally:
            if hold:
                cache.release_background()
            if present:  # the caller stopped early (or a load failed): drop the remaining pins
                cache.unpin(list(present))
            if ahead:  # the caller stopped early (or a load failed)
                cache.unpin(list(ahead))
            if not ok:  # this forward is over: its prefetches are of no use, their errors moot
                self._drop_all(discard=True)

    def use_fallback(self, cache: ExpertCache, below: float) -> None:
        """Serve misses of experts whose share of each token's routing weight is below
        `below` from their small copies, held in `cache` (runtime/fallback.py)."""
        self._fb, self._fb_below = cache, below
        self.reset_stats()

    def note_weights(self, layer: int, weights: torch.Tensor) -> None:
        if self._fb is not None:
            self._weights = (layer, weights)

    def _low(self, layer: int, blob: dict, present: set, rows: torch.Tensor | None) -> set:
        """The missed blob keys of this request to serve from their small copies: every
        expert using the blob has a share below the threshold for every token, and the
        small copy is smaller (an expert a plan stores at 2 bits gains nothing from it)."""
        w, self._weights = self._weights, None
        if w is None or w[0] != layer or rows is None:  # no weights for this request: full copies
            return set()
        shares = largest_shares(rows, w[1], self.num_experts)
        low: dict = {}
        for e, k in blob.items():
            if k not in present:
                low[k] = low.get(k, True) and shares[e] < self._fb_below
        return {k for k, v in low.items() if v and self._fb.blob_bytes(k) < self.cache.blob_bytes(k)}

    def resident(self, layer: int) -> set[int]:
        """The experts of `layer` cached or being read (cache-aware routing)."""
        return self.cache.present_ids(layer)

    def note_cache_routing(self, layer: int, slots: int, swapped: int) -> None:
        acc = self._phases[self._phase]
        acc["cr_slots"] += slots
        acc["cr_swapped"] += swapped

    def _tick(self, pos: int) -> None:
        """Layer request `pos` of this forward begins: the time since the previous one,
        less the stall in between, is one sample of the phase's per-layer compute time
        (and, in decode, of the break-even estimates)."""
        now, c = time.perf_counter(), self._counters()
        last = self._clock
        if last is not None and last[0] == pos - 1:
            _, t, b = last
            dt = now - t - (c.stall_s - b.stall_s)
            if dt > 0:
                old = self._layer_s.get(self._phase)
                self._layer_s[self._phase] = dt if old is None else old + LAYER_TIME_WEIGHT * (dt - old)
                if self._phase == "decode":
                    self._learn(dt, c.background_bytes - b.background_bytes, c.misses - b.misses, c.miss_s - b.miss_s)
        self._clock = (pos, now, c)

    def _learn(self, dt: float, bg_bytes: int, misses: int, miss_s: float) -> None:
        """One decode layer interval: `dt` compute seconds while `bg_bytes` of background
        reads finished, and `misses` demand reads that stalled `miss_s`."""
        w = COST_WEIGHT
        if misses:
            s = miss_s / misses
            self._miss_s = s if self._miss_s is None else self._miss_s + w * (s - self._miss_s)
        reads = bg_bytes / max(self._blob_min or self.cache.smallest_blob(), 1)
        if reads < 0.5:
            self._idle_s = dt if self._idle_s is None else self._idle_s + w * (dt - self._idle_s)
        elif self._idle_s is not None:
            s = (dt - self._idle_s) / reads  # negative samples too: noise averages out
            self._read_cost = s if self._read_cost is None else self._read_cost + w * (s - self._read_cost)

    def threshold(self) -> float:
        """The least predicted probability worth a read now: the configured one, or the
        measured break-even (read cost over demand stall), at least AUTO_FLOOR."""
        if self.prefetch.threshold is not None:
            return self.prefetch.threshold
        if self._read_cost is None or not self._miss_s:
            return AUTO_START
        return max(AUTO_FLOOR, self._read_cost / self._miss_s)

    # ----------------------------------------------------------------- prefetching

    def _rows_of(self, ids: Sequence[int], x: torch.Tensor, rows: torch.Tensor | None):
        """Expert ids per token row: with one row the request is exactly its top-k (kept
        as a list: the decode path); in prefill the block's own routing (N, k). A slot
        adaptive gating dropped (-1) repeats the row's first expert."""
        if x.shape[0] == 1 or rows is None:
            return list(ids)[: self.top_k]
        r = rows.numpy().astype(np.int16)  # (N, k)
        return np.where(r < 0, r[:, :1], r)

    def _prefetch(self, pos: int, ids: Sequence[int], x: torch.Tensor, rows: torch.Tensor | None) -> None:
        cfg, cache = self.prefetch, self.cache
        if pos + 1 >= self.L:
            return
        predictor = cfg.predictor
        if predictor.needs_rows:
            self._rows[pos] = self._rows_of(ids, x, rows)
            context = {pos: self._rows[pos]}
            if pos - 1 in self._rows:
                context[pos - 1] = self._rows[pos - 1]
        else:
            context = {pos: np.empty((x.shape[0], 0), np.int16) if x.shape[0] > 1 else []}
        E = self.num_experts
        theta = self.threshold()
        depth = min(cfg.layers, self.L - 1 - pos)
        if cfg.pacing:
            layer_s, rate = self._layer_s.get(self._phase), cache.bandwidth()
            if layer_s is None or rate is None:  # nothing measured yet: no basis to pace on
                self.pf_unmeasured += 1
                return
            per_layer = rate * layer_s  # bytes the link reads while one layer computes
            backlog = sum(r.length for r in self._records.values() if not r.future.done())
            if not self._blob_min:
                self._blob_min = cache.smallest_blob()
        todo = []  # (key, priority, guard, target)
        used = 0  # bytes admitted by this call
        looked = False
        for d in range(1, depth + 1):
            j = pos + d
            if cfg.pacing and per_layer * d - backlog - used < self._blob_min:
                continue  # not even one expert would arrive before layer j asks: look further
            looked = True
            ranked = predictor.ranked(j, pos, context, x, self.n_prefetch)
            if d == 1:
                self._predicted[j] = [e for e, _ in ranked]
            until = self._base + j
            wanted = list(dict.fromkeys(cache.blob_key((self.layers[j], e)) for e, p in ranked if p >= theta))
            if not wanted and ranked and ranked[0][1] >= AUTO_FLOOR and self._read_cost is not None \
                    and cfg.threshold is None:
                self._read_cost *= COST_DECAY  # held back by the cost alone: let it be measured again later
            present = set(cache.guard(wanted, until))  # cached or being read already: keep them for layer j
            for rank, key in enumerate(wanted):
                if key in present or key in self._records:
                    continue
                if cfg.pacing:
                    b = cache.blob_bytes(key)
                    if used + b > per_layer * d - backlog:  # it would still be reading when layer j asks
                        self.pf_late_skipped += 1
                        continue
                    used += b
                # By absolute target: earlier deadlines read first, whichever layer queued them.
                todo.append((key, PREFETCH + (self._base + j) * E + rank, until, j))
                self.pf_distance += j - pos
                self.pf_submitted += 1
            self._revise(j, set(wanted))
            if cfg.pacing:  # one target per layer: the next layer predicts the one after with fresher inputs
                break
        if not looked:
            self.pf_no_window += 1
        if todo:
            futures = cache.submit_many([t[:3] for t in todo])  # one wake-up of the loader
            for (key, _, _, j), fut in zip(todo, futures):
                self._records[key] = _Prefetch(key, j, fut, cache.blob_bytes(key), self._phase)

    def _revise(self, target: int, wanted: set) -> None:
        """Cancel the queued prefetches for `target` that its newest prediction no longer
        admits (one already reading goes on: part of it is spent)."""
        for key in [k for k, r in self._records.items() if r.target == target and k not in wanted]:
            if self._records[key].future.cancel():
                del self._records[key]
                self.pf_revoked += 1

    def _settle(self, pos: int, needed: set, wanted: set) -> None:
        """Layer `pos` is being served: judge the prefetches made for it. `needed`: the
        blob keys read for it, `wanted`: the experts it routed to (they differ only where
        experts share a blob)."""
        acc = self._phases[self._phase]
        predicted = self._predicted.pop(pos, None)
        if predicted is not None:
            got = {k[1] for k in wanted}
            acc["pred_hits"] += len(got.intersection(predicted))
            acc["pred_needed"] += len(got)
            acc["pred_predicted"] += len(predicted)
        for key in [k for k, r in self._records.items() if r.target <= pos]:
            r = self._records.pop(key)
            r.needed = key in needed
            if not r.future.done():
                if r.needed:
                    if r.future.cancel():  # still queued: it is read on demand instead
                        self.pf_cancelled += 1
                        self.pf_not_started += 1
                        continue
                    acc["pf_late"] += 1  # being read: the demand waits for it (and promotes it)
                elif r.future.abort():  # unneeded and still queued: never started
                    self.pf_cancelled += 1
                    continue
                self._retired.append(r)  # accounted for when its read ends
                continue
            self._finish(r)

    def _finish(self, r: _Prefetch) -> None:
        """Account for a settled prefetch whose load is done; raise its error, if any."""
        acc = self._phases[r.phase]
        try:
            read = r.future.result()
        except CancelledError:
            self.pf_cancelled += 1
            return
        except CacheFull:
            self.pf_no_room += 1
            return
        except ReadAborted as e:
            self.pf_aborted += 1
            acc["pf_wasted_bytes"] += e.bytes_read
            acc["pf_bytes"] += e.bytes_read
            return
        except BaseException:
            if r.discard:
                return
            raise
        if not read:  # it was cached by the time the loader got to it
            return
        self.pf_reads += 1
        acc["pf_bytes"] += r.length
        if r.needed:
            acc["pf_hits"] += 1
        else:
            acc["pf_wasted_bytes"] += r.length

    def _poll_retired(self) -> None:
        """Check background loads that finished since the last request: errors surface here."""
        if self._records:
            for r in list(self._records.values()):
                f = r.future
                if f.done() and not f.cancelled() and f.exception() is not None and not isinstance(
                        f.exception(), (CacheFull, ReadAborted)):
                    del self._records[r.key]
                    self._finish(r)  # raises
        for r in self._take_finished():
            self._finish(r)

    def _take_finished(self) -> list[_Prefetch]:
        """Remove the retired prefetches whose loads have ended, and return them."""
        done, running = [], []
        for r in self._retired:
            (done if r.future.done() else running).append(r)
        self._retired = running
        return done

    def _drop_all(self, discard: bool) -> None:
        """Cancel or abort every unsettled prefetch (a new forward, or this one failed)."""
        for r in self._records.values():
            r.needed = False
            r.discard = discard
            if r.future.abort():
                self.pf_cancelled += 1
            else:
                self._retired.append(r)
        self._records.clear()
        if discard:
            for r in self._retired:
                r.discard = True

    # ----------------------------------------------------------------- statistics

    def stats(self) -> OffloadStats:
        """The statistics since the last reset (its to_dict() is the JSON; runtime/stats.py)."""
        self._account()
        c = self.cache.stats()
        fc = self._fb.stats() if self._fb is not None else None  # the small copies' cache
        read, read_s, stall = c.bytes_read, c.read_s, c.stall_s  # every read from storage
        if fc is not None:
            read, read_s, stall = read + fc.bytes_read, round(read_s + fc.read_s, 6), round(stall + fc.stall_s, 6)
        dec, pre = self._phases["decode"], self._phases["prefill"]
        tot = {k: dec[k] + pre[k] for k in _COUNTERS}
        dh, dm = dec["hits"], dec["misses"]
        info, tokens, decoded = self.info, self.tokens, self.decode_forwards
        resident = info["resident_bytes"]
        baseline = info["baseline_rss_bytes"]

        def ratio(a, b):
            return round(a / b, 4) if b else 0.0

        experts = ExpertReads(
            mode=info["mode"], cache_policy=info["cache_policy"], io=self.cache.io_mode,
            hits=c.hits, misses=c.misses, hit_rate=c.hit_rate, bytes_read=read,
            bytes_read_per_token=round(read / tokens) if tokens else 0,
            read_s=read_s, verify=info["verify"], verify_s=c.verify_s, stall_s=stall,
            stall_s_per_token=round(stall / tokens, 6) if tokens else 0.0,
            evictions=c.evictions, compactions=c.compactions, forward_tokens=tokens,
            decode_hit_rate=round(dh / (dh + dm), 4) if dh + dm else 0.0,
            decode_bytes_read_per_token=round(dec["bytes"] / decoded) if decoded else 0,
            decode_stall_s=round(dec["stall_s"], 6),
            decode_stall_s_per_token=round(dec["stall_s"] / decoded, 6) if decoded else 0.0,
        )
        memory = MemoryUse(
            budget_bytes=info["budget_bytes"], min_budget_bytes=info["min_budget_bytes"], resident_bytes=resident,
            kv_bytes=info["kv_bytes"], workspace_bytes=info["workspace_bytes"], cache_bytes=c.cache_bytes,
            cache_peak_bytes=c.cache_peak_bytes,
            # Memory this model holds or reserves: resident weights, the KV cache for the
            # context, the compute workspace, and every slab page ever written.
            budget_used_bytes=resident + info["kv_bytes"] + info["workspace_bytes"] + c.cache_touched_bytes
            + (fc.cache_touched_bytes if fc is not None else 0),
            baseline_rss_bytes=baseline, rss_over_baseline_bytes=max(peak_rss_bytes() - baseline, 0),
        )
        cfg = self.prefetch
        activity = None
        if cfg.active:
            activity = PrefetchActivity(
                predictor=cfg.predictor.name, layers=cfg.layers, experts=self.n_prefetch, reads=self.pf_reads,
                bytes=tot["pf_bytes"], hits=tot["pf_hits"], late=tot["pf_late"],
                wasted_bytes=tot["pf_wasted_bytes"], cancelled=self.pf_cancelled,
                not_started=self.pf_not_started, aborted=self.pf_aborted, no_room=self.pf_no_room,
                threshold="auto" if cfg.threshold is None else cfg.threshold,
                threshold_now=round(self.threshold(), 4),
                read_cost_ms=round(1000 * self._read_cost, 4) if self._read_cost is not None else None,
                demand_read_ms=round(1000 * self._miss_s, 4) if self._miss_s is not None else None,
                pacing=cfg.pacing, revoked=self.pf_revoked, skipped_late=self.pf_late_skipped,
                no_window=self.pf_no_window, unmeasured=self.pf_unmeasured, submitted=self.pf_submitted,
                mean_distance=ratio(self.pf_distance, self.pf_submitted),
                decode_layer_ms=round(1000 * self._layer_s["decode"], 4) if "decode" in self._layer_s else None,
                read_bandwidth_bps=c.read_bandwidth_bps, background_paused=c.background_paused,
                decode_hits=dec["pf_hits"], decode_late=dec["pf_late"], decode_wasted_bytes=dec["pf_wasted_bytes"],
                decode_wasted_bytes_per_token=round(dec["pf_wasted_bytes"] / decoded) if decoded else 0,
                recall=ratio(tot["pred_hits"], tot["pred_needed"]),
                precision=ratio(tot["pred_hits"], tot["pred_predicted"]),
                decode_recall=ratio(dec["pred_hits"], dec["pred_needed"]),
                decode_precision=ratio(dec["pred_hits"], dec["pred_predicted"]),
                switched=self._switch is not None,
                decode_tokens_on=self._switch.on_tokens if self._switch is not None else decoded,
                decode_tokens_off=self._switch.off_tokens if self._switch is not None else 0,
            )
        prefetch = PrefetchStats(cfg.active, activity, None if cfg.active or not cfg.reason else cfg.reason)
        margin = info.get("cache_aware_routing")
        routing = None
        if margin is not None:
            routing = CacheRouting(
                margin=margin, routed_slots=tot["cr_slots"], rerouted_slots=tot["cr_swapped"],
                reroute_rate=ratio(tot["cr_swapped"], tot["cr_slots"]),
                rerouted_per_token=ratio(tot["cr_swapped"], tokens),
                decode_reroute_rate=ratio(dec["cr_swapped"], dec["cr_slots"]),
                decode_rerouted_per_token=ratio(dec["cr_swapped"], decoded),
            )
        fallback = None
        if fc is not None:
            fallback = FallbackReads(
                below=self._fb_below, uses=self.fb_uses, reads=fc.misses, hits=fc.hits, bytes_read=fc.bytes_read,
                bytes_saved=self.fb_saved, stall_s=fc.stall_s, decode_reads=dec["fb_reads"],
                decode_reads_per_token=ratio(dec["fb_reads"], decoded), cache_bytes=fc.cache_bytes)
        return OffloadStats(experts, memory, self.cache.throttle_stats(), prefetch, routing, c.compact_bytes,
                            c.background_loads, self.cache.eviction_stats(), fallback)

    def reset_stats(self) -> None:
        for r in self._retired:  # loads of an earlier request: their errors are moot
            r.discard = True
        self._take_finished()  # forgotten: the statistics restart
        self.cache.reset_stats()  # its store's and throttle's counters too
        self.tokens = self.forwards = self.decode_forwards = 0
        self.pf_reads = self.pf_cancelled = self.pf_not_started = self.pf_aborted = self.pf_no_room = 0
        self.pf_revoked = self.pf_late_skipped = self.pf_no_window = self.pf_unmeasured = self.pf_distance = 0
        self.pf_submitted = 0
        if self._switch is not None:
            self._switch.on_tokens = self._switch.off_tokens = 0
        self.fb_uses = self.fb_saved = 0  # experts served from small copies; bytes their reads saved
        if self._fb is not None:
            self._fb.reset_stats()
        self._phase = "prefill"
        self._phases = {p: {k: 0 for k in _COUNTERS} for p in ("prefill", "decode")}
        self._mark = (0, 0, 0, 0.0)

    def close(self) -> None:
        self._drop_all(discard=True)
        self.cache.close()
        if self._fb is not None:
            self._fb.close()
