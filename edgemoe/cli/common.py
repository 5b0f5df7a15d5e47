"""Options and helpers shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from ..runtime.config import DEFAULT_POLICY, MODES, PREDICTORS, RuntimeConfig
from ..runtime.policies import POLICIES
from ..runtime.stats import OffloadStats, PrefetchStats
from ..utils import format_bytes

if TYPE_CHECKING:
    from ..api import Engine
    from ..generate import GenerationStats

# runtime.config (MODES, DEFAULT_POLICY, PREDICTORS, RuntimeConfig) imports no torch, which
# would make '--help' and argument errors slow (1-3 s): tests/cli/test_startup.py.


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory or a directory from 'edgemoe convert' (default: the bundled model)")
    p.add_argument("--dtype", default=None, help="compute dtype: auto (default), float32, bfloat16")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="compute threads (default: 1 for small models, all cores otherwise)")
    p.add_argument("--adaptive-gating", type=float, default=None, metavar="MASS",
                   help="adaptive top-k gating: keep each token's top experts only until MASS of routing "
                        "probability (e.g. 0.8), at least one; fewer experts computed and read (default: plain top-k)")
    p.add_argument("--memory", default=None,
                   help="memory budget for the whole run (resident weights, KV cache, compute workspace, expert "
                        "cache), e.g. 800MB, 1.5GB (converted models)")
    p.add_argument("--ctx-size", "-c", type=int, default=None, metavar="N",
                   help="context size in tokens, prompt plus generated (default: the model's maximum positions, "
                        "capped so that the KV cache takes at most half of what --memory leaves)")
    p.add_argument("--no-onednn", action="store_true",
                   help="keep every matmul off oneDNN (by default prefill uses it on CPUs with AVX-512-BF16/AMX)")
    g = p.add_argument_group("offloaded runtime (directories written by 'edgemoe convert')")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="io-exp: read experts on demand into a cache within --memory (default); "
                        "io-free: read every expert into RAM at load (the paper's IO-FREE baseline)")
    g.add_argument("--cache-policy", choices=list(POLICIES), default=None,
                   help=f"expert cache eviction policy (default {DEFAULT_POLICY}); belady replays --trace")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="routing trace for --cache-policy belady, recorded with --record-trace on the same prompt")
    g.add_argument("--record-trace", default=None, metavar="FILE",
                   help="record which experts every token picked to FILE (.npz); works with any model directory")
    g.add_argument("--verify", choices=("first", "always"), default=None,
                   help="check each expert's checksum on the first read of it in this process (default for generate "
                        "and chat) or on every read from storage (default for serve: a long-running server must not "
                        "serve bytes changed on disk; costs 4-10%% of decode speed when experts are re-read, "
                        "edgemoe_lab/results/verify_cost.md)")
    g.add_argument("--no-direct-io", action="store_true",
                   help="read experts through the page cache instead of with O_DIRECT")
    g.add_argument("--read-throttle", default=None, metavar="RATE",
                   help="cap expert reads at RATE, e.g. 90MB/s (a Raspberry Pi SD card) or 550MB/s (a Jetson SSD)")
    g.add_argument("--no-prefetch", action="store_true",
                   help="read experts only when routed to (default: preload the experts predicted for later layers)")
    g.add_argument("--predictor", choices=("auto", *PREDICTORS), default=None,
                   help="expert predictor for preloading: gate (next layer's router on this layer's input), table "
                        "(EdgeMoE path statistics), freq, combined (default auto: combined if the model directory "
                        "has a fitted predictor.npz from 'edgemoe fit-predictor', else gate)")
    g.add_argument("--prefetch-experts", type=int, default=None, metavar="N",
                   help="experts to preload per layer at most (default: top-k + 1)")
    g.add_argument("--prefetch-layers", type=int, default=None, metavar="D",
                   help="how many MoE layers ahead to preload at most (default 3 with pacing, which looks that far "
                        "only when layers are short; 1 with --no-prefetch-pacing)")
    g.add_argument("--prefetch-threads", type=int, default=None, metavar="N",
                   help="background reader threads (default 1)")
    g.add_argument("--prefetch-threshold", type=float, default=None, metavar="P",
                   help="preload only experts the predictor gives at least this probability of being used, "
                        "0 to 1 (default 0.5; 0: its top N whatever it says)")
    g.add_argument("--no-prefetch-pacing", action="store_true",
                   help="queue every predicted expert, even those the link cannot deliver before their layer "
                        "(default: preload only what the measured read rate delivers in time)")
    g.add_argument("--no-read-ahead", action="store_true",
                   help="read a layer's missed experts in the compute thread, one at a time (default: the loader "
                        "reads them one after another while the compute thread works with the experts it has; "
                        "off with --cache-policy belady)")
    g.add_argument("--cache-aware-routing", type=float, default=None, metavar="MARGIN",
                   help="lossy: when a token's chosen expert is not in memory, use an expert that is, if its routing "
                        "probability is within MARGIN of the chosen one's (0 to 1, e.g. 0.1; fewer reads, slightly "
                        "different output; default off)")
    g.add_argument("--fallback-below", type=float, default=None, metavar="W",
                   help="lossy: on a miss of an expert whose share of the token's routing weight is below W (0 to "
                        "1, e.g. 0.3), read its small copy instead of the full one (models converted with "
                        "--fallback-bits; fewer bytes read, slightly different output; default off)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=None,
                   help="maximum tokens to generate (default 256, or what the context has room for)")
    p.add_argument("--temperature", "--temp", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template to use instead of the model's (a .jinja/text file, or a JSON file "
                        "with a \"chat_template\" key as Hugging Face writes chat_template.json)")


def read_file_bytes(path, label: str, max_bytes: int | None = None, too_big: str = "") -> bytes:
    """The bytes of a file a user named; every problem is an InvalidArgument starting with
    `label` (e.g. "--prompt-file PATH"). Files over `max_bytes` are refused with `too_big`."""
    try:
        with open(path, "rb") as f:
            if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                raise InvalidArgument(f"{label}: {too_big}")
            return f.read()
    except FileNotFoundError:
        raise InvalidArgument(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{label}: is a directory; give a file") from None
    except OSError as e:
        raise InvalidArgument(f"{label}: cannot read: {e.strerror or e}") from None


def read_text_file(path, flag: str, errors: str = "replace") -> str:
    """The text of a file named by a command-line flag; every problem is an InvalidArgument
    naming the flag and the file. Invalid UTF-8 becomes U+FFFD (errors="replace", as for
    prompts given on the command line) or is refused (errors="strict")."""
    data = read_file_bytes(path, f"{flag} {path}")
    if errors == "strict":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{flag} {path}: not valid UTF-8 (byte {e.start})") from None
    return data.decode("utf-8", errors)


def read_chat_template(path) -> str:
    """A chat template from --chat-template FILE, checked for Jinja syntax errors now
    rather than at the first message."""
    import json

    text = read_text_file(path, "--chat-template", errors="strict")
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"--chat-template {path}: invalid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise InvalidArgument(f"--chat-template {path}: a JSON template file must be an object with a string "
                                  "\"chat_template\"")
        text = data["chat_template"]
    if not text.strip():
        raise InvalidArgument(f"--chat-template {path}: the template is empty")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        raise InvalidArgument(f"--chat-template {path}: line {e.lineno}: {e.message}") from None
    return text


def sampling_kwargs(args: argparse.Namespace) -> dict:
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidArgument("--max-tokens must be at least 1")
    return dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def runtime_config(args: argparse.Namespace, **options) -> RuntimeConfig:
    """The RuntimeConfig the command-line flags ask for (edgemoe.load's options; a flag not
    given leaves its option None, "not given"), checked before torch is imported. `options`
    are more of them that a command sets itself (serve: parallel)."""
    return RuntimeConfig(
        dtype=args.dtype,
        memory=args.memory,
        threads=args.threads,
        adaptive_gating=getattr(args, "adaptive_gating", None),
        ctx_size=getattr(args, "ctx_size", None),
        onednn=not getattr(args, "no_onednn", False),
        plan=getattr(args, "plan", None),
        cache_policy=getattr(args, "cache_policy", None),
        mode=getattr(args, "mode", None),
        trace=getattr(args, "trace", None),
        verify=getattr(args, "verify", None),
        direct_io=False if getattr(args, "no_direct_io", False) else None,
        read_throttle=getattr(args, "read_throttle", None),
        prefetch=False if getattr(args, "no_prefetch", False) else None,
        predictor=getattr(args, "predictor", None),
        prefetch_experts=getattr(args, "prefetch_experts", None),
        prefetch_layers=getattr(args, "prefetch_layers", None),
        prefetch_threads=getattr(args, "prefetch_threads", None),
        prefetch_threshold=getattr(args, "prefetch_threshold", None),
        prefetch_pacing=False if getattr(args, "no_prefetch_pacing", False) else None,
        read_ahead=False if getattr(args, "no_read_ahead", False) else None,
        cache_aware_routing=getattr(args, "cache_aware_routing", None),
        fallback_below=getattr(args, "fallback_below", None),
        **options,
    )


def check_output_path(path, flag: str) -> None:
    """Fail before any work if `path` cannot be written: its directory must exist and be
    writable, and the path must not be a directory."""
    import os
    from pathlib import Path

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InvalidArgument(f"{flag} {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise InvalidArgument(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InvalidArgument(f"{flag} {path}: not writable")


def load_engine(args: argparse.Namespace, **load_kwargs) -> "Engine":
    """The engine the options ask for; load_kwargs are more edgemoe.load options (serve: parallel)."""
    path = getattr(args, "record_trace", None)
    if path:
        check_output_path(path, "--record-trace")
    template_file = getattr(args, "chat_template", None)
    template = read_chat_template(template_file) if template_file is not None else None
    config = runtime_config(args, **load_kwargs)
    from ..api import load

    engine = load(args.model, config=config)
    if template is not None:
        from pathlib import Path

        engine.tokenizer.chat_template = template
        engine.tokenizer.chat_template_source = Path(template_file)
    if path:
        from ..runtime.trace import TraceRecorder
        from ..seq2seq import Seq2SeqTraceRecorder, is_seq2seq

        # An encoder-decoder's forwards cover one stack each: the other's positions are -1.
        recorder = (Seq2SeqTraceRecorder if is_seq2seq(engine.model) else TraceRecorder)(engine.model)

        def save() -> None:
            trace = recorder.save(path)
            eprint(f"routing trace: {trace.header['tokens']} tokens, {trace.header['forwards']} forwards -> {path}")

        engine.on_close.append(save)
    return engine


def format_stats(stats: "GenerationStats") -> str:
    """Human summary printed after generation."""
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"decode: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tok/s | "
        f"peak RSS: {format_bytes(stats.peak_rss_bytes)}"
    ]
    extra = stats.extra
    if isinstance(extra, OffloadStats):  # the offloaded runtime's statistics
        lines += _offload_lines(extra)
        extra = extra.tail()  # the rest, printed as "key: value"
    if extra:
        lines.append(" | ".join(f"{k}: {_fmt(k, v)}" for k, v in extra.items() if not isinstance(v, (dict, list))))
    return "\n".join(lines)


def _offload_lines(s: "OffloadStats") -> list[str]:
    """Readable lines (experts, memory, prefetch, cache-aware routing) from the offloaded
    provider's statistics."""
    x, m = s.experts, s.memory
    io = x.io
    if s.throttle.rate_bps:
        io += f", throttled to {format_bytes(s.throttle.rate_bps)}/s"
    experts = (f"experts: {x.mode}, {x.cache_policy} cache | hit rate {100 * x.hit_rate:.1f}% ({x.hits} hits, "
               f"{x.misses} misses; decode {100 * x.decode_hit_rate:.1f}%) | read {format_bytes(x.bytes_read)} "
               f"({format_bytes(x.bytes_read_per_token)}/token, decode {format_bytes(x.decode_bytes_read_per_token)}"
               f"/token, {io} I/O) in {x.read_s:.2f} s | checksums ({x.verify}) {x.verify_s:.2f} s | "
               f"stall {x.stall_s:.2f} s")
    limit = "unlimited" if m.budget_bytes is None else format_bytes(m.budget_bytes)
    used = m.budget_used_bytes
    memory = (f"memory: budget {limit} | used {format_bytes(used)} (resident {format_bytes(m.resident_bytes)} + "
              f"cache {format_bytes(used - m.resident_bytes)} of {format_bytes(m.cache_bytes)}) | peak RSS "
              f"{format_bytes(m.rss_over_baseline_bytes)} over a baseline of {format_bytes(m.baseline_rss_bytes)}")
    lines = [experts, memory, _prefetch_line(s.prefetch, x.decode_stall_s_per_token)]
    r = s.cache_routing
    if r is not None:
        lines.append(f"cache-aware routing: margin {r.margin:g} | {r.rerouted_slots} routed slots swapped to resident "
                     f"experts ({100 * r.reroute_rate:.1f}%, {r.rerouted_per_token:.2f}/token; decode "
                     f"{100 * r.decode_reroute_rate:.1f}%, {r.decode_rerouted_per_token:.2f}/token)")
    f = s.fallback
    if f is not None:
        lines.append(f"small copies on a miss: below {f.below:g} | {f.uses} served ({f.reads} read, {f.hits} cached; "
                     f"decode {f.decode_reads_per_token:.2f} reads/token) | read {format_bytes(f.bytes_read)}, saved "
                     f"{format_bytes(f.bytes_saved)} against full copies | stall {f.stall_s:.2f} s")
    return lines


def _prefetch_line(p: "PrefetchStats", stall_tok: float) -> str:
    """One line on preloading."""
    a = p.activity
    if not p.on or a is None:
        return f"prefetch: {p.off_reason or 'off'} | decode stall {1000 * stall_tok:.2f} ms/token"
    threshold = a.threshold
    if threshold == "auto":
        threshold = f"auto (now {a.threshold_now:.2f})"
    pacing = "paced to the link" if a.pacing else "not paced"
    decoded = a.decode_tokens_on + a.decode_tokens_off
    if a.switched and decoded:  # on and off by measured speed (prefetch.DecodeSwitch)
        pacing += f", on for {a.decode_tokens_on} of {decoded} decode tokens (measured: faster off for the others)"
    return (f"prefetch: {a.predictor} predictor, {a.experts} experts x {a.layers} layer(s) ahead, threshold "
            f"{threshold}, {pacing} | {a.hits} hits ({a.late} late), wasted {format_bytes(a.wasted_bytes)} | "
            f"predictor recall {100 * a.recall:.1f}% (decode {100 * a.decode_recall:.1f}%), precision "
            f"{100 * a.precision:.1f}% | decode stall {1000 * stall_tok:.2f} ms/token")


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and key.endswith("bytes"):
        return format_bytes(value)
    return str(value)


def eprint(*a, **k) -> None:
    print(*a, file=sys.stderr, **k)


def check_output_dir(path, flag: str) -> None:
    """Create output directory `path` now (with its parents), so that a bad one fails before
    any work rather than after it."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InvalidArgument(f"{flag} {path}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"{flag} {path}: cannot create the directory: {e.strerror or e}") from None
