"""`edgemoe generate`: stream a completion for a prompt."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_args, add_sampling_args, eprint, format_stats, load_engine, sampling_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe generate", description="Generate text from a prompt.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="prompt text; '-' reads standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) instead of streaming")
    add_sampling_args(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            eprint("edgemoe: error: give a prompt with --prompt TEXT (or '-' to read standard input)")
            return 2
        prompt = sys.stdin.read()
    if not prompt:
        eprint("edgemoe: error: the prompt is empty")
        return 2
    kwargs = sampling_kwargs(args)
    engine = load_engine(args)
    with engine:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}
            ]
            prompt = engine.chat_prompt(messages)
        if args.json:
            result = engine.generate(prompt, **kwargs)
            print(json.dumps({**result.to_dict(), "model": str(engine.path), "load": engine.info}))
            return 0
        last = None
        for r in engine.stream(prompt, **kwargs):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
        sys.stdout.write("\n")
        eprint("--")
        eprint(format_stats(last.stats))
    return 0
