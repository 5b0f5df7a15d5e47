"""`edgemoe chat`: an interactive conversation using the model's chat template.

The KV cache is kept between turns, so each turn only prefills the new messages. When
the conversation outgrows the context size (--ctx-size), the oldest messages after the
system message are dropped, and the chat says so.
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


# A reply needs at least this many free positions when --max-tokens is not given.
MIN_REPLY_TOKENS = 32


def fit_context(engine, history: list[dict], keep: int, max_tokens: int | None) -> tuple[list[int] | None, int]:
    """The chat prompt for `history` and how many of its oldest messages (after the first
    `keep`, the system message) had to go for prompt + reply to fit the context; (None, 0)
    when even the newest message alone does not fit."""
    room = max_tokens if max_tokens is not None else min(MIN_REPLY_TOKENS, engine.ctx_size // 4)
    for dropped in range(len(history) - keep):
        prompt = engine.chat_prompt(history[:keep] + history[keep + dropped:])
        if len(prompt) + room <= engine.ctx_size:
            return prompt, dropped
    return None, 0


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
            prompt, dropped = fit_context(engine, history, len(system), kwargs["max_tokens"])
            if prompt is None:
                history.pop()
                eprint(f"(this message does not fit the context of {engine.ctx_size} tokens with room for a reply; "
                       "send a shorter one, or restart with a larger --ctx-size)")
                continue
            if dropped:
                del history[len(system):len(system) + dropped]
                eprint(f"(context full: dropped the {dropped} oldest message{'s' if dropped > 1 else ''} "
                       f"to fit {engine.ctx_size} tokens)")
            reply, last = [], None
            for r in engine.stream(prompt, cache=cache, **kwargs):
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
