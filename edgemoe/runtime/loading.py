"""`load_converted`: a directory from `edgemoe convert` -> model with offloaded experts.

The memory budget M covers the whole run: resident weights, the KV cache for the context
size, a compute workspace (prefill activations, and what oneDNN keeps where the CPU uses
it: see edgemoe.cpu), and the expert cache, which gets whatever is left (never more than
all the experts). M below resident + KV + workspace + the largest top-k experts of one
layer cannot run a token and is refused, naming that minimum, before anything is read.

Modes (the paper's baselines):
- io-exp   experts read on demand into the byte-budgeted cache (default)
- io-free  every expert read into RAM at load time; no reads while generating
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import attach_provider, build_on_meta, load_resident, parse_dtype
from ..cpu import ONEDNN_RESERVE, prefill_onednn
from ..errors import BudgetError, EdgeMoEError, InvalidArgument, StoreError
from ..models import get_family
from ..models.moe import check_cache_aware_routing, set_cache_aware_routing
from ..quant.resident import kept_as_stored, swap_int4_, swap_int8_
from ..store.manifest import ALIGN, Manifest, read_manifest
from ..store.reader import ExpertStore, check_manifest, manifest_dtype, read_resident
from ..store.tensorfile import TensorFileError, element_size, read_header
from ..utils import format_bytes, keep_frees_for_reuse, return_large_frees_to_os, rss_bytes
from .cache import ExpertCache
from .fallback import capacity as fallback_capacity, smallest_cache
from .offload import OffloadedProvider
from .policies import PolicyContext, make_policy
from .config import DEFAULT_POLICY, MODES, RuntimeConfig  # noqa: F401 (MODES, DEFAULT_POLICY re-exported)
from .prefetch import DEFAULT_THREADS, prefetch_config
from .trace import RoutingTrace

PREFILL_CHUNK = 512  # tokens per prefill forward (generate.generate_step's default)
MIN_CTX = 256  # a budget must hold at least this much context (or the model's maximum, if less)
KV_SHARE = 0.5  # the default context may take at most this share of what the budget leaves for KV and cache


def workspace_bytes(args, dtype: torch.dtype, ctx_size: int, onednn: bool) -> int:
    """Memory a forward needs beyond weights, KV and expert cache: live prefill activations
    for one chunk (the native path measured 8-10 hidden-size fp32 vectors per token at a
    peak; counted as one expert's fp32 intermediate plus 8 hidden-size vectors), plus
    ONEDNN_RESERVE where oneDNN runs the reduced-precision matmuls."""
    chunk = min(PREFILL_CHUNK, ctx_size)
    acts = chunk * 4 * (args.expert_dim + 8 * args.hidden_size)
    return acts + (ONEDNN_RESERVE if onednn else 0)


def min_cache_bytes(manifest: Manifest, top_k: int) -> int:
    """Cache bytes one token needs: the largest top-k blobs of any one layer."""
    per_layer: dict[int, list[int]] = {}
    for e in manifest.experts:
        per_layer.setdefault(e.layer, []).append(e.length)
    return max((sum(sorted(v, reverse=True)[:top_k]) for v in per_layer.values()), default=0)


def resident_nbytes(path: Path, manifest: Manifest, dtype: torch.dtype, fp32: set[str] | frozenset = frozenset()) -> int:
    """Bytes the resident weights take in RAM at `dtype` (the names in `fp32` in float32,
    the int4 layers' fp16 scales as stored), from the file header alone."""
    try:
        infos, _ = read_header(path / manifest.resident_file)
    except FileNotFoundError:
        raise StoreError(f"{path / manifest.resident_file}: resident weights file is missing; "
                         "the converted model is incomplete") from None
    except TensorFileError as e:
        raise StoreError(f"{e}; the resident weights are corrupted, re-run 'edgemoe convert'") from None
    total = 0
    stored = kept_as_stored(manifest.resident_int4)
    for name, i in infos.items():
        numel = i.nbytes // element_size(i.dtype)
        elem = element_size(i.dtype if name in stored else torch.float32 if name in fp32 else dtype)
        total += numel * elem if i.dtype.is_floating_point else i.nbytes
    return total


@dataclass(frozen=True)
class MemoryPlan:
    """How load_converted shares out a budget (bytes), decided before any weight is read."""

    min_budget: int  # the least budget that runs: resident + workspace + one layer's experts + KV for min context
    ctx_size: int  # the context size used
    kv_bytes: int  # the KV cache for ctx_size
    workspace: int  # compute workspace (workspace_bytes)
    capacity: int  # the expert cache
    onednn: bool  # whether prefill uses oneDNN (its reserve is in workspace)
    parallel: int = 1  # sequences decoded together (serve --parallel): kv_bytes holds one KV cache per slot


def memory_plan(args, dt: torch.dtype, path, budget: int | None, ctx_size: int, explicit_ctx: bool, resident: int,
                kv_per_token: int, one_layer: int, experts_total: int, onednn: bool, mode: str,
                parallel: int = 1, fallback: int = 0) -> MemoryPlan:
    """The budget arithmetic of load_converted, also used by 'edgemoe info'. ctx_size is the
    checked context size (the model's maximum unless explicit_ctx); resident (resident_nbytes),
    one_layer (min_cache_bytes) and experts_total (Manifest.expert_bytes) are bytes. A budget
    below the minimum, or an io-free budget below every expert, is a BudgetError naming path.
    parallel: slots whose sequences are decoded together (edgemoe.batching): each keeps its
    own KV cache for ctx_size, so every KV figure below counts `parallel` of them. fallback:
    the least cache of small copies (--fallback-below, runtime/fallback.py), held besides."""
    max_pos = args.max_position_embeddings
    min_ctx = ctx_size if explicit_ctx else min(max_pos, MIN_CTX)
    onednn = prefill_onednn(onednn, dt, resident + experts_total)
    kv_per_token *= parallel  # from here on: the KV bytes of one position in every slot
    slots = f" x {parallel} slots (--parallel)" if parallel > 1 else ""

    def fixed(ctx: int) -> int:  # what a budget must hold besides the KV cache, at this context size
        return resident + workspace_bytes(args, dt, ctx, onednn) + one_layer + fallback

    min_budget = fixed(min_ctx) + min_ctx * kv_per_token
    if budget is not None and budget < min_budget and mode != "io-free":  # io-free: its own check below
        ws = workspace_bytes(args, dt, min_ctx, onednn)
        raise BudgetError(
            f"memory budget {format_bytes(budget)} ({budget} bytes) is too small for {path}: the resident weights "
            f"take {format_bytes(resident)}, the KV cache for {min_ctx} tokens{slots} {format_bytes(min_ctx * kv_per_token)}, "
            f"the compute workspace {format_bytes(ws)} and one layer's top-{args.top_k} experts "
            f"{format_bytes(one_layer)}"
            + (f", and one small copy for --fallback-below {format_bytes(fallback)}" if fallback else "")
            + f"; the minimum is {format_bytes(min_budget)} (--memory {min_budget})"
            + (f", or run fewer --parallel slots (the KV cache of one takes {format_bytes(min_ctx * kv_per_token // parallel)})"
               if parallel > 1 else "")
        )
    if budget is not None and not explicit_ctx:
        # Default context: the model's maximum, stepped down in whole MIN_CTX steps (not below
        # min_ctx) while its KV cache would take more than KV_SHARE of what the budget leaves
        # (io-free: while everything would not fit).
        def too_big(ctx: int) -> bool:
            if mode == "io-free":
                return fixed(ctx) + ctx * kv_per_token + experts_total > budget
            return ctx * kv_per_token > KV_SHARE * (budget - fixed(ctx))

        while ctx_size > min_ctx and too_big(ctx_size):
            ctx_size = max(min_ctx, (ctx_size - 1) // MIN_CTX * MIN_CTX)
    workspace = workspace_bytes(args, dt, ctx_size, onednn)
    kv_bytes = ctx_size * kv_per_token
    if mode == "io-free":
        need = resident + kv_bytes + workspace + experts_total
        if budget is not None and budget < need:
            raise BudgetError(f"--mode io-free keeps every expert in RAM and needs {format_bytes(need)} "
                              f"({need} bytes: resident weights, KV cache, workspace and every expert), more than "
                              f"the budget of {format_bytes(budget)}; use --mode io-exp for smaller budgets")
        capacity = experts_total
    elif budget is None:
        capacity = experts_total
    else:
        capacity = min((budget - resident - kv_bytes - workspace - fallback) // ALIGN * ALIGN, experts_total)
    return MemoryPlan(min_budget, ctx_size, kv_bytes, workspace, capacity, onednn, parallel)


def _warm_up_torch(dtype: torch.dtype) -> None:
    """Make the baseline the interpreter plus torch *initialised*: torch sets up its CPU
    kernels, thread pools and meta-device dispatch lazily, on first use, which costs a
    few MB whatever the model. The tokenizer library is loaded right after the model, so
    it is imported here too."""
    import tokenizers  # noqa: F401
    import torch.nn.functional as F

    for dt in {dtype, torch.float32}:
        x = torch.ones(2, 8, dtype=dt)
        F.silu(F.linear(x, x))
        q = torch.ones(1, 2, 2, 8, dtype=dt)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with torch.device("meta"):
        torch.nn.Linear(8, 8)


def check_ctx_size(ctx_size, max_positions: int, source: str) -> int:
    """The context size to use: `ctx_size` checked against the model, or its maximum positions."""
    if ctx_size is None:
        return max_positions
    if isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or ctx_size < 1:
        raise InvalidArgument(f"ctx_size must be a positive integer, got {ctx_size!r}")
    if ctx_size > max_positions:
        raise InvalidArgument(f"ctx_size {ctx_size} is more than the {max_positions} positions {source} was "
                              "trained for (max_position_embeddings)")
    return ctx_size


def load_converted(path: str | Path, config: RuntimeConfig | None = None, **options) -> tuple[torch.nn.Module, dict]:
    """Load a converted model with its experts offloaded, as `config` (a RuntimeConfig,
    runtime/config.py, which documents every option) asks; or, without one, as the
    RuntimeConfig made of `options` (edgemoe.load's keywords).

    The budget (config.memory) covers resident weights, the KV cache for the context size
    (one per parallel slot), the compute workspace and the expert cache (memory_plan).
    Prefill uses oneDNN where `cpu.prefill_onednn` says so (the CPU and the model's size,
    never the budget), and its reserve is then counted in the budget (info["onednn"] says
    which). Preloading: runtime/prefetch.py (`prefetch_config`). Cache-aware routing is
    lossy and io-exp only (models/routers.py, `cache_route`).
    """
    if config is None:
        config = RuntimeConfig.from_options(**options)
    elif options:
        raise InvalidArgument(f"give load_converted either a config or options ({', '.join(sorted(options))}), "
                              "not both")
    path = Path(path)
    if config.plan is not None:
        raise InvalidArgument(f"{path}: --plan applies to Hugging Face directories; a converted model already "
                              "has its formats")
    return_large_frees_to_os()  # large temporaries leave RSS when freed, not at exit
    dtype = config.dtype
    _warm_up_torch(parse_dtype(dtype, {}) if dtype not in (None, "auto") else torch.bfloat16)
    baseline = rss_bytes()
    t0 = time.perf_counter()
    mode, policy_name, budget, throttle = config.run_mode, config.policy, config.memory, config.read_throttle
    ctx_size, onednn, parallel = config.ctx_size, config.onednn, config.parallel
    cache_aware_routing = config.cache_aware_routing

    manifest = read_manifest(path)
    args = check_manifest(manifest)
    family = get_family(manifest.model_type, str(manifest.path))
    stored = manifest_dtype(manifest)
    dt = stored if dtype in (None, "auto") else parse_dtype(dtype, manifest.config)

    # Budget arithmetic, before reading any weights.
    max_pos = args.max_position_embeddings
    explicit_ctx = ctx_size is not None
    ctx_size = check_ctx_size(ctx_size, max_pos, str(manifest.path))
    model = build_on_meta(family, args)  # shapes only; no memory
    if cache_aware_routing is not None:
        check_cache_aware_routing(model, cache_aware_routing)
    kv_per_token = model.kv_bytes_per_token(dt)
    resident = resident_nbytes(path, manifest, dt, model.fp32_names())
    # Recurrent layers' states (conv windows, scan states) are a fixed size per sequence, not
    # per token: they join what the budget holds besides the KV cache, once per slot.
    state = model.state_bytes(dt) * parallel
    resident += state
    experts_total = manifest.expert_bytes
    one_layer = min_cache_bytes(manifest, args.top_k)
    fb_least = smallest_cache(manifest) if config.fallback_below is not None else 0  # runtime/fallback.py
    plan = memory_plan(args, dt, path, budget, ctx_size, explicit_ctx, resident, kv_per_token, one_layer,
                       experts_total, onednn, mode, parallel, fb_least)
    min_budget, ctx_size, kv_bytes, workspace = plan.min_budget, plan.ctx_size, plan.kv_bytes, plan.workspace
    capacity, onednn = plan.capacity, plan.onednn

    store = ExpertStore(path, direct_io=config.direct_io is not False, manifest=manifest, throttle=throttle)
    fb_cache = None
    try:
        if config.fallback_below is not None:  # the small copies' cache: its least, plus its share of the rest
            fb_store = ExpertStore(path, direct_io=config.direct_io is not False, manifest=manifest,
                                   throttle=store.throttle, fallback=True)
            extra = fallback_capacity(manifest, capacity) - fb_least if budget is not None else 0
            extra = max(min(extra, capacity - one_layer), 0)
            capacity -= extra
            fb_cache = ExpertCache(fb_store, fb_least + extra, make_policy("lru", PolicyContext(
                args.moe_layers(), args.experts_per_layer, args.top_k)), args.expert_act, dt, config.verify_mode)
        trace_obj = RoutingTrace.load(config.trace) if config.trace is not None else None
        ctx = PolicyContext(args.moe_layers(), args.experts_per_layer, args.top_k, trace_obj)
        policy = make_policy(policy_name, ctx)
        tensors = read_resident(path, manifest, dt, model.fp32_names())
        if manifest.resident_int8:  # resident linear layers stored as int8 (convert --resident int8)
            swap_int8_(model, manifest.resident_int8, dt, str(manifest.path))
        if manifest.resident_int4:  # ... or as int4 (convert --resident int4)
            swap_int4_(model, manifest.resident_int4, dt, str(manifest.path))
        try:
            load_resident(model, tensors, str(path / manifest.resident_file))
        except EdgeMoEError as e:
            raise StoreError(f"{e}; re-run 'edgemoe convert'") from None
        del tensors
        cache = ExpertCache(store, capacity, policy, args.expert_act, dt, config.verify_mode,
                            loader_threads=config.prefetch_threads or DEFAULT_THREADS)
        pf = prefetch_config(path, model, args, config, capacity, one_layer)
    except BaseException:
        store.close()
        if fb_cache is not None:
            fb_cache.close()
        raise
    info = {
        "kind": "converted",
        "dtype": str(dt).removeprefix("torch."),
        "mode": mode,
        "cache_policy": policy_name,
        "verify": config.verify_mode,
        "budget_bytes": budget,
        "min_budget_bytes": min_budget,
        "min_cache_bytes": one_layer,  # one layer's largest top-k experts: the least cache that runs a token
        "resident_bytes": resident - state,  # the weights; state_bytes below
        "ctx_size": ctx_size,
        "kv_bytes": kv_bytes,
        "state_bytes": state,
        "parallel": parallel,
        "workspace_bytes": workspace,
        "onednn": onednn,  # prefill on oneDNN (its reserve is in workspace_bytes)
        "expert_bytes": experts_total,
        "cache_bytes": cache.capacity,
        "io": store.io_mode,
        "formats": {name: sum(1 for e in manifest.experts if e.format == name) for name in manifest.formats},
        "baseline_rss_bytes": baseline,
        "read_throttle_bps": throttle,
        **pf.describe(),
        "cache_aware_routing": cache_aware_routing,
    }
    provider = OffloadedProvider(cache, info, args.moe_layers(), pf, read_ahead=config.reads_ahead)
    if fb_cache is not None:
        provider.use_fallback(fb_cache, config.fallback_below)
        info["fallback_below"] = config.fallback_below
        info["fallback_cache_bytes"] = fb_cache.capacity
    try:
        if mode == "io-free":
            cache.load_all()
            loaded = cache.counters()
            info["load_bytes_read"] = loaded.bytes_read
            info["load_read_s"] = round(loaded.read_s, 6)
            provider.reset_stats()
    except BaseException:
        provider.close()
        raise
    attach_provider(model, provider)
    if cache_aware_routing is not None:
        set_cache_aware_routing(model, cache_aware_routing)
    keep_frees_for_reuse(workspace)  # loaded: from here on, temporaries are reused (the workspace)
    info["load_s"] = round(time.perf_counter() - t0, 6)
    return model, info
