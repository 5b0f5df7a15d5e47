"""`edgemoe generate`: stream a completion for a prompt."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidArgument
from .common import (add_chat_template_arg, add_model_args, add_sampling_args, eprint, format_stats, load_engine,
                     read_text_file, sampling_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe generate", description="Generate text from a prompt.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", default=None, help="prompt text; '-' reads standard input")
    src.add_argument("--prompt-file", "-f", default=None, metavar="FILE",
                     help="read the prompt from FILE (UTF-8); one final newline, which editors add, is dropped")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_chat_template_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) instead of streaming")
    add_sampling_args(p)
    g = p.add_argument_group("translation models (NLLB-MoE)")
    g.add_argument("--target-lang", default=None, metavar="CODE",
                   help="language to translate into, a language code of the tokenizer (e.g. deu_Latn): the "
                        "target starts with it")
    g.add_argument("--source-lang", default=None, metavar="CODE",
                   help="language of the prompt (e.g. fra_Latn), in place of the one the tokenizer was saved with")
    return p


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt, --prompt-file or standard input; an empty one is an error."""
    if args.prompt_file is not None:
        prompt = read_text_file(args.prompt_file, "--prompt-file")
        # Editors end files with a newline; a prompt that ends there splits tokens where
        # the model never saw a boundary (":\n    " is one token in code models).
        prompt = prompt.removesuffix("\n").removesuffix("\r")
        if not prompt:
            raise InvalidArgument(f"--prompt-file {args.prompt_file}: the file is empty")
        return prompt
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise InvalidArgument("give a prompt with --prompt TEXT or --prompt-file FILE "
                                  "(or --prompt - to read standard input)")
        prompt = sys.stdin.read()
        if not prompt:
            raise InvalidArgument("the prompt is empty: standard input had no text (give a prompt with "
                                  "--prompt TEXT or --prompt-file FILE)")
    if not prompt:
        raise InvalidArgument("the prompt is empty (--prompt '')")
    return prompt


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.chat:
        for flag, value in (("--system", args.system), ("--chat-template", args.chat_template)):
            if value is not None:
                raise InvalidArgument(f"{flag} is used only with --chat (it formats the prompt as a chat)")
    prompt = read_prompt(args)
    kwargs = sampling_kwargs(args)
    kwargs.update(target_lang=args.target_lang, source_lang=args.source_lang)
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
