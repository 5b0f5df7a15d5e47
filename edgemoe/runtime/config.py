"""`RuntimeConfig`: every option of `edgemoe.load`, checked in one place.

The CLI builds one from its flags (cli/common.runtime_config) and the API from its
arguments (api.load); both give equal configs for the same options. Everything that can
be judged from the value alone is checked here, when the config is made, before torch is
imported or any file is read. What needs the model is checked at load, with the model at
hand: the dtype name (checkpoint.parse_dtype), the context size against the model's
positions (loading.check_ctx_size), the budget against the model's minimum
(loading.memory_plan), and whether the model's routers support adaptive gating or
cache-aware routing (models/moe.py).

Adding an option: a field below with its `doc` (edgemoe.load's docstring is built from
them; tests/runtime/test_config.py checks that every field is a parameter of `load` and
appears in its help), its check in `__post_init__`, a parameter of `api.load`, and its
flag in cli/common.add_model_args + `runtime_config`.

No torch here: the CLI imports this module before torch (tests/cli/test_startup.py).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import InvalidArgument
from ..store.throttle import parse_rate
from ..utils import parse_size
from .policies import POLICIES

MODES = ("io-exp", "io-free")
DEFAULT_MODE = "io-exp"
DEFAULT_POLICY = "edgemoe"
VERIFY = ("first", "always")
# A copy of runtime.predict.METHODS (importing predict imports torch);
# tests/cli/test_startup.py checks that they match.
PREDICTORS = ("freq", "table", "gate", "combined")
MAX_PARALLEL = 64  # slots at most (each holds a KV cache of the context size)
# More threads than this many times the cores only adds contention (and a huge count
# makes OpenMP spend minutes creating threads).
MAX_THREADS_PER_CORE = 4


def check_threads(threads, name: str = "threads") -> int | None:
    """Validate a thread count: None, or an integer from 1 to 4x the cores."""
    if threads is None:
        return None
    limit = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise InvalidArgument(f"{name} must be at least 1 and at most {limit} (4x the {os.cpu_count()} cores), "
                              f"got {threads!r}")
    return threads


def check_parallel(parallel, name: str = "parallel") -> int:
    """Validate a number of parallel slots: an integer from 1 to MAX_PARALLEL."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
        raise InvalidArgument(f"{name} must be an integer from 1 to {MAX_PARALLEL}, got {parallel!r}")
    return parallel


def check_prefetch_options(predictor: str | None, experts: int | None, layers: int | None,
                           threads: int | None, threshold: float | None = None, pacing: bool | None = None,
                           prefetch: bool | None = None) -> None:
    """Refuse an unknown predictor name, counts below 1, a threshold outside [0, 1], and
    preloading settings given together with prefetch=False (they would be ignored)."""
    if predictor is not None and predictor not in ("auto", *PREDICTORS):
        raise InvalidArgument(f"unknown predictor {predictor!r} (choose from auto, {', '.join(PREDICTORS)})")
    for name, v in (("prefetch experts", experts), ("prefetch layers", layers), ("prefetch threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidArgument(f"{name} must be an integer of at least 1, got {v!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise InvalidArgument(f"prefetch threshold must be a probability from 0 to 1, got {threshold!r}")
    if pacing is not None and not isinstance(pacing, bool):
        raise InvalidArgument(f"prefetch pacing must be True or False, got {pacing!r}")
    if prefetch is False:
        given = [n for n, v in (("predictor", predictor), ("prefetch experts", experts), ("prefetch layers", layers),
                                ("prefetch threshold", threshold), ("prefetch pacing", pacing)) if v is not None]
        if given:
            raise InvalidArgument(f"{', '.join(given)} set with preloading off (--no-prefetch / prefetch=False): "
                                  "drop one or the other")


def _probability(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


def _doc(text: str, default=None, **kw):
    """A field with its documentation (edgemoe.load's docstring lists it)."""
    return field(default=default, metadata={"doc": " ".join(text.split())}, **kw)


# Options of the offloaded runtime: a Hugging Face directory (everything in RAM) takes none.
OFFLOAD_OPTIONS = ("memory", "cache_policy", "mode", "trace", "verify", "direct_io", "read_throttle", "prefetch",
                   "predictor", "prefetch_experts", "prefetch_layers", "prefetch_threads", "prefetch_threshold",
                   "prefetch_pacing", "read_ahead", "cache_aware_routing", "fallback_below")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to load and run a model: every option of `edgemoe.load`, checked when made.

    None means "not given": the default applies, and a Hugging Face directory accepts no
    option of the offloaded runtime that was given (OFFLOAD_OPTIONS). Sizes and rates are
    kept in bytes (memory="800MB" and memory=800_000_000 make equal configs), a trace as
    a Path."""

    dtype: object = _doc("compute dtype: 'auto' (the stored dtype), 'float32', 'bfloat16', ...; None: auto "
                         "(checked against the model at load).")
    memory: int | str | None = _doc(
        "for converted models, the byte budget for the whole run: resident weights, KV cache, compute workspace "
        "and expert cache ('800MB', '1.5GB' or an int; kept as bytes). None means unlimited.")
    threads: int | None = _doc(
        "compute threads for this process (torch's setting is process-wide), 1 to 4x the cores; None picks one "
        "thread for small models and torch's default (all cores) otherwise.")
    adaptive_gating: float | None = _doc(
        "adaptive top-k gating (Edge-MoE survey): each token keeps its top experts only until this share of "
        "routing probability (e.g. 0.8, in (0, 1]), at least one and at most top-k; fewer experts computed and "
        "read. None keeps plain top-k.")
    ctx_size: int | None = _doc(
        "the most tokens (prompt + generated) a sequence may hold; the KV cache is allocated for it inside the "
        "memory budget. None: the model's maximum positions, capped so that the KV cache takes at most half of "
        "what the budget leaves after the resident weights and one layer's experts.")
    onednn: bool = _doc(
        "False keeps every matmul off oneDNN (by default prefill uses it where the CPU has AVX-512-BF16/AMX and "
        "the model has 240 MB of weights or more, and the budget reserves what it needs; see edgemoe.cpu).",
        default=True)
    parallel: int = _doc(
        f"sequences that can be decoded together (Engine.generate_batch, the server's slots), 1 to "
        f"{MAX_PARALLEL}: one KV cache of ctx_size each, all counted in the memory budget.", default=1)
    plan: str | Path | None = _doc(
        "Hugging Face directories only: a bitwidth plan (PLAN.json from 'edgemoe plan') applied in RAM, each "
        "expert quantized to its planned format, instead of converting first.")
    cache_policy: str | None = _doc(
        f"expert cache eviction policy: {', '.join(POLICIES)} (default {DEFAULT_POLICY}); belady replays `trace`.")
    mode: str | None = _doc(
        "io-exp (default): read experts on demand into a cache within `memory`; io-free: read every expert into "
        "RAM at load (the paper's IO-FREE baseline).")
    trace: str | Path | None = _doc(
        "routing trace (.npz, recorded on the same prompt) that cache_policy='belady' replays.")
    verify: str | None = _doc(
        "'first' (default): check each expert's checksum on the first read of it in this process; 'always': on "
        "every read from storage.")
    direct_io: bool | None = _doc("False reads experts through the page cache instead of with O_DIRECT.")
    read_throttle: int | str | None = _doc(
        "cap expert reads at this rate, e.g. '90MB/s' (a Raspberry Pi SD card) or bytes per second; kept as "
        "bytes per second.")
    prefetch: bool | None = _doc(
        "False reads experts only when routed to; by default (io-exp) the experts predicted for later layers are "
        "preloaded on background threads.")
    predictor: str | None = _doc(
        f"expert predictor for preloading: auto (default: combined if the model directory has a fitted "
        f"predictor.npz, else gate), {', '.join(PREDICTORS)}.")
    prefetch_experts: int | None = _doc("experts to preload per layer at most (default: top-k + 1).")
    prefetch_layers: int | None = _doc(
        "how many MoE layers ahead to preload at most (default 3 with pacing, 1 without).")
    prefetch_threads: int | None = _doc("background reader threads (default 1).")
    prefetch_threshold: float | None = _doc(
        "preload only experts the predictor gives at least this probability of being used, 0 to 1 (default: the "
        "break-even probability measured online; 0: its top N whatever it says).")
    prefetch_pacing: bool | None = _doc(
        "False queues every predicted expert, even those the link cannot deliver before their layer (default: "
        "preload only what the measured read rate delivers in time).")
    read_ahead: bool | None = _doc(
        "False reads a layer's missed experts in the compute thread, one at a time; by default (io-exp) a layer "
        "that misses experts has the background loader read them one after another while the compute thread "
        "works with the experts it already has. Off by default with cache_policy='belady': the oracle's misses "
        "are the optimum for one read at a time, and read-ahead pins change what it may evict.")
    cache_aware_routing: float | None = _doc(
        "lossy: a margin in (0, 1]; a chosen expert that is not in memory is swapped for one that is and whose "
        "routing probability is within the margin (fewer reads, slightly different output; io-exp only). None: "
        "off.")

    fallback_below: float | None = _doc(
        "lossy: a share of a token's routing weight in [0, 1]; a miss of an expert whose share is below it (for "
        "every token routed to it) reads the expert's small copy instead of the full one (models converted with "
        "'edgemoe convert --fallback-bits 2|3'; runtime/fallback.py; io-exp only). 0: never. None: off.")

    def __post_init__(self) -> None:
        # The checks, in the order load made them before they were gathered here (the
        # first problem found is the one reported).
        if not isinstance(self.onednn, bool):
            raise InvalidArgument(f"onednn must be True or False, got {self.onednn!r}")
        check_threads(self.threads)
        check_parallel(self.parallel)
        if self.mode is not None and self.mode not in MODES:
            raise InvalidArgument(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.cache_policy is not None and self.cache_policy not in POLICIES:
            raise InvalidArgument(f"unknown cache policy {self.cache_policy!r} (choose from {', '.join(POLICIES)})")
        if self.trace is not None and self.policy != "belady":
            raise InvalidArgument("a routing trace (--trace) is only used by --cache-policy belady")
        if self.memory is not None:
            self._set("memory", parse_size(self.memory))
        if self.read_throttle is not None:
            self._set("read_throttle", parse_rate(self.read_throttle))
        check_prefetch_options(self.predictor, self.prefetch_experts, self.prefetch_layers, self.prefetch_threads,
                               self.prefetch_threshold, self.prefetch_pacing, self.prefetch)
        if self.cache_aware_routing is not None and self.mode == "io-free":
            raise InvalidArgument("cache-aware routing prefers experts already in memory; with --mode io-free every "
                                  "expert is, so it would change nothing: use --mode io-exp or drop it")
        if self.cache_aware_routing is not None and not _probability(self.cache_aware_routing):
            raise InvalidArgument(f"cache-aware routing margin must be a routing-probability difference in (0, 1], "
                                  f"got {self.cache_aware_routing!r}")
        if self.fallback_below is not None and (isinstance(self.fallback_below, bool)
                                                or not isinstance(self.fallback_below, (int, float))
                                                or not 0 <= self.fallback_below <= 1):
            raise InvalidArgument(f"--fallback-below must be a share of a token's routing weight in [0, 1], "
                                  f"got {self.fallback_below!r}")
        if self.fallback_below is not None and self.mode == "io-free":
            raise InvalidArgument("--fallback-below reads small copies on a miss; with --mode io-free nothing is "
                                  "missed, so it would change nothing: use --mode io-exp or drop it")
        if self.adaptive_gating is not None and not _probability(self.adaptive_gating):
            raise InvalidArgument(f"adaptive gating mass must be in (0, 1], got {self.adaptive_gating}")
        if self.verify is not None and self.verify not in VERIFY:
            raise InvalidArgument(f"verify must be 'first' or 'always', got {self.verify!r}")
        for name in ("direct_io", "prefetch", "read_ahead"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise InvalidArgument(f"{name} must be True or False, got {v!r}")
        if self.ctx_size is not None and (isinstance(self.ctx_size, bool) or not isinstance(self.ctx_size, int)
                                          or self.ctx_size < 1):
            raise InvalidArgument(f"ctx_size must be a positive integer, got {self.ctx_size!r}")
        for name in ("trace", "plan"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)):
                    raise InvalidArgument(f"{name} must be a file path, got {v!r}")
                self._set(name, Path(v))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalizing a frozen field once, while it is made

    # ----------------------------------------------------------------- what applies

    @property
    def policy(self) -> str:
        """The eviction policy in effect."""
        return self.cache_policy or DEFAULT_POLICY

    @property
    def run_mode(self) -> str:
        """The mode in effect: io-exp unless io-free was asked for."""
        return self.mode or DEFAULT_MODE

    @property
    def reads_ahead(self) -> bool:
        """Whether the loader reads a layer's misses ahead: as asked, else on except with Belady."""
        return self.read_ahead if self.read_ahead is not None else self.policy != "belady"

    @property
    def verify_mode(self) -> str:
        """When checksums are checked: "first" unless "always" was asked for."""
        return self.verify or "first"

    def offload_options(self) -> list[str]:
        """The options of the offloaded runtime that were given (a Hugging Face directory takes none)."""
        return [name for name in OFFLOAD_OPTIONS if getattr(self, name) is not None]

    @classmethod
    def from_options(cls, **options) -> "RuntimeConfig":
        """A config from edgemoe.load's keyword options (see `from_keywords`)."""
        return from_keywords(cls, "edgemoe.load", options)


def from_keywords(cls, where: str, options: dict):
    """An instance of the dataclass `cls` from the keyword options given to `where`; a name
    that is none of its fields is a TypeError, as for any unexpected keyword argument (also
    GenerateOptions, edgemoe/options.py)."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{where}() got unexpected option(s) {', '.join(unknown)} (its options: {', '.join(names)})")
    return cls(**options)


def options_doc(cls, indent: str = "", width: int = 88) -> str:
    """One paragraph per field of the dataclass `cls`, from the fields' `doc` metadata (the
    help of edgemoe.load and Engine.stream)."""
    return "\n".join(textwrap.fill(f"{f.name}: {f.metadata['doc']}", width, initial_indent=indent,
                                   subsequent_indent=indent + "    ") for f in fields(cls))


def load_doc() -> str:
    """The docstring of edgemoe.load (and edgemoe.api.load): what it does, then every
    option of RuntimeConfig, from its fields."""
    return f"""Load a model for generation; returns an edgemoe.api.Engine.

path: a Hugging Face model directory (everything in RAM) or a directory written by
`edgemoe convert` (experts offloaded to an expert store). None means the bundled model.
A string of the form "ORG/NAME" that is not an existing path is a Hugging Face hub id:
its safetensors weights, config and tokenizer are downloaded into the hub cache (see
edgemoe.hub).
config: an edgemoe.runtime.config.RuntimeConfig holding the options below; give either
it or the options as keywords. Every option is checked before anything is read (bad
values raise InvalidArgument); what depends on the model is checked at load.

Options (keywords; None or leaving one out gives its default):
{options_doc(RuntimeConfig)}
"""
