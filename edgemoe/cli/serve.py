"""`edgemoe serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from ..errors import InvalidArgument
from ..runtime.config import MAX_PARALLEL
from .common import add_chat_template_arg, add_model_args, eprint, load_engine

DEFAULT_TIMEOUT = 30.0  # same defaults as edgemoe.server (not imported here: it loads torch)
DEFAULT_MAX_CONNECTIONS = 64
# Slots decoded together (edgemoe.batching). A few: each keeps a KV cache of --ctx-size tokens
# inside --memory, and with 8-expert top-2 models the gain per added stream falls quickly
# (edgemoe_lab/results/concurrent.md: 1.2-1.3x at 2 streams, 1.6-1.9x at 4).
DEFAULT_PARALLEL = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe serve", description="Serve a model over an OpenAI-compatible HTTP API.")
    add_model_args(p)
    add_chat_template_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="default max_tokens when a request gives none (default 256; never more than the context allows)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"close a connection that sends nothing for this long while a request is read, or that "
                        f"stays idle between requests (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help=f"open connections served at once; more get a 503 (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--parallel", "-np", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help=f"requests decoded together, as llama-server's slots (default {DEFAULT_PARALLEL}): each slot "
                        "keeps a KV cache of --ctx-size tokens inside --memory; more requests wait in a queue")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject bad option values before the model is loaded."""
    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_tokens < 1:
        raise InvalidArgument(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise InvalidArgument(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.max_connections < 1:
        raise InvalidArgument(f"--max-connections must be at least 1, got {args.max_connections}")
    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise InvalidArgument(f"--parallel must be between 1 and {MAX_PARALLEL}, got {args.parallel}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from ..server import make_server

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgemoe serve: %(levelname)s: %(message)s"))
    logger = logging.getLogger("edgemoe.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger.propagate = False

    if args.verify is None and args.model is not None:
        from ..store.manifest import is_converted

        if is_converted(args.model):
            args.verify = "always"  # a server runs for days: re-check every expert read from storage
    parallel = args.parallel
    if parallel > 1 and args.model is not None:
        from ..hub import resolve_model
        from ..text2text import is_seq2seq_dir

        if is_seq2seq_dir(resolve_model(args.model)):  # its batched decode steps would continue decoder-only rows
            eprint(f"edgemoe serve: {args.model} is an encoder-decoder model: requests run one at a time, each "
                   f"sequence whole (--parallel {parallel} applies to decoder-only models)", flush=True)
            parallel = 1
    engine = load_engine(args, parallel=parallel)
    try:
        server = make_server(engine, args.host, args.port, model_name=args.model_name,
                             default_max_tokens=args.max_tokens, verbose=args.verbose,
                             timeout=args.timeout, max_connections=args.max_connections)
    except OSError as e:
        engine.close()
        eprint(f"edgemoe: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 1
    host, port = server.server_address[:2]
    eprint(f"edgemoe serve: {engine.path} on http://{host}:{port}/v1, {engine.parallel} slot"
           f"{'s' if engine.parallel > 1 else ''} of {engine.ctx_size} tokens (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # running generations stop at their next token
        engine.close()  # waits for the step in progress; then nothing uses the engine any more
    return 0
