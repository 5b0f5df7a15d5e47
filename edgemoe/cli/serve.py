"""`edgemoe serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse

from .common import add_model_args, eprint, load_engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe serve", description="Serve a model over an OpenAI-compatible HTTP API.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens when a request gives none")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..server import make_server

    engine = load_engine(args)
    try:
        server = make_server(engine, args.host, args.port, model_name=args.model_name,
                             default_max_tokens=args.max_tokens, verbose=args.verbose)
    except OSError as e:
        eprint(f"edgemoe: error: cannot listen on {args.host}:{args.port}: {e.strerror}")
        return 1
    host, port = server.server_address[:2]
    eprint(f"edgemoe serve: {engine.path} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0
