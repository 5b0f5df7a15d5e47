"""`edgemoe chat`: an interactive conversation using the model's chat template.

The KV cache is kept between turns, so each turn only prefills the new messages.
Commands: /reset clears the conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, eprint, format_stats, load_engine, sampling_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe chat", description="Chat interactively with a model.")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print speed and memory statistics after each reply")
    add_sampling_args(p, temperature=0.7)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    engine = load_engine(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    cache = engine.new_cache()
    if interactive:
        eprint(f"edgemoe chat: {engine.path}  (/reset to clear, /exit or Ctrl-D to quit)")
    with engine:
        while True:
            if interactive:
                sys.stdout.write(">>> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history, cache = list(system), engine.new_cache()
                eprint("(conversation cleared)")
                continue
            history.append({"role": "user", "content": text})
            reply, last = [], None
            for r in engine.stream(engine.chat_prompt(history), cache=cache, **kwargs):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                reply.append(r.text)
                last = r
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
            if args.stats:
                eprint(format_stats(last.stats))
    return 0
