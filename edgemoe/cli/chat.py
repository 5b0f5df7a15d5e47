"""`edgemoe chat`: an interactive conversation using the model's chat template.

The KV cache is kept between turns, so each turn only prefills the new messages. When
the conversation outgrows the context size (--ctx-size), the oldest messages after the
system message are dropped, and the chat says so.

In a terminal, lines are edited and recalled with GNU readline (the standard library's
`readline` module: arrow keys, Ctrl-R search, Tab completes commands), Ctrl-C stops a
reply and keeps the conversation, and Ctrl-D quits. Standard input that is not a
terminal (a pipe, a file) is read line by line with the same commands.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from ..errors import InvalidArgument
from .common import (add_chat_template_arg, add_model_args, add_sampling_args, check_output_path, eprint,
                     format_stats, load_engine, read_file_bytes, sampling_kwargs)

HELP = """commands:
  /help         this list
  /reset        start a new conversation (keeps the system message)
  /save FILE    write the conversation to FILE (JSON)
  /load FILE    continue a conversation saved with /save (or a JSON list of {"role", "content"} messages)
  /stats        speed, memory and context use of the last reply
  /exit, /quit  leave (or Ctrl-D)
keys: Ctrl-C stops a reply (and clears the line being typed); end a line with \\ to continue it on the next;
      start a message with // to send text beginning with /"""

COMMAND_NAMES = ("/help", "/reset", "/save", "/load", "/stats", "/exit", "/quit")
ROLES = ("system", "user", "assistant")
CHAT_FORMAT = "edgemoe-chat"
CHAT_VERSION = 1
MAX_CHAT_FILE_BYTES = 64 * 1024**2  # a saved conversation larger than this is surely not one


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe chat", description="Chat interactively with a model.",
                                epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_chat_template_arg(p)
    p.add_argument("--stats", action="store_true", help="print speed and memory statistics after each reply")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="keep the typed lines' history (up arrow) in FILE across sessions (default: this session only)")
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


# ----------------------------------------------------------------------------- saved conversations


def check_messages(messages, source: str) -> list[dict]:
    """Validate a conversation read from a file: a list of {"role", "content"} objects with
    string contents, roles system/user/assistant, a system message only first."""
    if not isinstance(messages, list):
        raise InvalidArgument(f"{source}: \"messages\" must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages, 1):
        where = f"{source}: message {i}"
        if not isinstance(m, dict):
            raise InvalidArgument(f"{where}: expected an object with \"role\" and \"content\", got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidArgument(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 1:
            raise InvalidArgument(f"{where}: a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def read_conversation(path: str) -> list[dict]:
    """Messages from a file written by /save, or a JSON list of messages, or an object with
    "messages" (an OpenAI request body). JSON only: nothing is ever unpickled."""
    raw = read_file_bytes(path, str(path), MAX_CHAT_FILE_BYTES,
                          f"larger than {MAX_CHAT_FILE_BYTES // 1024**2} MiB; not a saved conversation")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not valid UTF-8 (byte {e.start}); expected a JSON conversation") from None
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"{path}: not valid JSON ({e}); expected a conversation saved with /save") from None
    if isinstance(data, dict):
        fmt = data.get("format")
        if fmt is not None and fmt != CHAT_FORMAT:
            raise InvalidArgument(f"{path}: format {fmt!r} is not {CHAT_FORMAT!r}")
        version = data.get("version", CHAT_VERSION)
        if fmt == CHAT_FORMAT and version != CHAT_VERSION:
            raise InvalidArgument(f"{path}: conversation version {version!r} is not supported (expected {CHAT_VERSION})")
        if "messages" not in data:
            raise InvalidArgument(f"{path}: no \"messages\" key; expected a conversation saved with /save")
        data = data["messages"]
    return check_messages(data, path)


def write_conversation(path: str, messages: list[dict], model: str) -> None:
    """Write the conversation as JSON, atomically (a temporary file renamed into place)."""
    import os
    import tempfile

    check_output_path(path, "/save")
    p = Path(path)
    body = {"format": CHAT_FORMAT, "version": CHAT_VERSION, "model": model, "messages": messages}
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- input


class LineReader:
    """Reads the user's lines: with readline's editing and history in a terminal, plainly
    from a pipe or file. Returns None at the end of input (Ctrl-D)."""

    def __init__(self, interactive: bool, history: str | None):
        self.interactive = interactive
        self.history = history
        self.readline = None
        if interactive:
            try:
                import readline  # line editing and history for input(); absent on some platforms
            except ImportError:
                readline = None
            self.readline = readline
        if history is not None and self.readline is None:
            why = "standard input is not a terminal" if not interactive else "readline is not available here"
            eprint(f"edgemoe: warning: --history {history} is not used: {why}")
        if self.readline is not None:
            self.readline.set_completer(self._complete)
            self.readline.set_completer_delims(" \t\n")
            self.readline.parse_and_bind("tab: complete")
            if history is not None and Path(history).is_file():
                try:
                    self.readline.read_history_file(history)
                except OSError as e:
                    raise InvalidArgument(f"--history {history}: cannot read: {e.strerror or e}") from None

    @staticmethod
    def _complete(text: str, state: int) -> str | None:
        matches = [c + " " for c in COMMAND_NAMES if c.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    def read(self) -> str | None:
        """One message: a line, or several joined when each but the last ends with a backslash."""
        parts = []
        prompt = ">>> "
        while True:
            line = self._line(prompt)
            if line is None:
                return "\n".join(parts) if parts else None
            if line.endswith("\\"):
                parts.append(line[:-1])
                prompt = "... "
                continue
            parts.append(line)
            return "\n".join(parts)

    def _line(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:  # Ctrl-D: end the prompt's line so that the shell starts on a fresh one
                sys.stdout.write("\n")
                sys.stdout.flush()
                return None
        line = sys.stdin.readline()
        return line.rstrip("\n").rstrip("\r") if line else None

    def save(self) -> None:
        if self.readline is not None and self.history is not None:
            try:
                self.readline.set_history_length(1000)
                self.readline.write_history_file(self.history)
            except OSError as e:
                eprint(f"edgemoe: warning: --history {self.history}: cannot write: {e.strerror or e}")


# ----------------------------------------------------------------------------- the chat


class Chat:
    """A conversation with an engine: history, KV cache, and the slash commands."""

    def __init__(self, engine, kwargs: dict, system: str | None, stats_after_reply: bool):
        self.engine = engine
        self.kwargs = kwargs
        self.system = [{"role": "system", "content": system}] if system else []
        self.history = list(self.system)
        self.cache = engine.new_cache()
        self.stats_after_reply = stats_after_reply
        self.last_stats = None
        self.last_stopped = False

    # --- commands

    def command(self, text: str) -> bool:
        """Run a slash command; False means leave the chat."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            eprint(HELP)
        elif name == "/reset":
            self.history, self.cache = list(self.system), self.engine.new_cache()
            self.last_stats = None
            eprint("(conversation cleared)")
        elif name in ("/save", "/load"):
            if not arg:
                eprint(f"({name} needs a file name: {name} FILE)")
            else:
                try:
                    self.save(arg) if name == "/save" else self.load(arg)
                except InvalidArgument as e:
                    eprint(f"({name} failed: {e})")
        elif name == "/stats":
            eprint(self.stats_text())
        else:
            eprint(f"(unknown command {name}; /help lists the commands, // sends a message that starts with /)")
        return True

    def save(self, path: str) -> None:
        write_conversation(path, self.history, str(self.engine.path))
        n = len(self.history)
        eprint(f"(saved {n} message{'' if n == 1 else 's'} to {path})")

    def load(self, path: str) -> None:
        messages = read_conversation(path)
        if not any(m["role"] == "system" for m in messages):
            messages = self.system + messages  # keep --system unless the file has its own
        self.history = messages
        self.system = messages[:1] if messages and messages[0]["role"] == "system" else []
        self.last_stats = None  # the KV cache keeps any prefix this conversation shares
        turns = sum(m["role"] != "system" for m in messages)
        eprint(f"(loaded {turns} message{'' if turns == 1 else 's'} from {path}; the next reply continues that "
               "conversation)")

    def stats_text(self) -> str:
        e = self.engine
        used = len(self.cache.tokens)
        turns = sum(m["role"] != "system" for m in self.history)
        lines = [f"conversation: {turns} message{'' if turns == 1 else 's'}{' + a system message' if self.system else ''} | "
                 f"context: {used} of {e.ctx_size} tokens in the KV cache"]
        if self.last_stats is None:
            lines.append("no reply yet")
        else:
            if self.last_stopped:
                lines.append("last reply (stopped with Ctrl-C):")
            lines.append(format_stats(self.last_stats))
        return "\n".join(lines)

    # --- a turn

    def send(self, text: str) -> None:
        keep = len(self.system)
        self.history.append({"role": "user", "content": text})
        prompt, dropped = fit_context(self.engine, self.history, keep, self.kwargs["max_tokens"])
        if prompt is None:
            self.history.pop()
            eprint(f"(this message does not fit the context of {self.engine.ctx_size} tokens with room for a reply; "
                   "send a shorter one, or restart with a larger --ctx-size)")
            return
        if dropped:
            del self.history[keep:keep + dropped]
            eprint(f"(context full: dropped the {dropped} oldest message{'s' if dropped > 1 else ''} "
                   f"to fit {self.engine.ctx_size} tokens)")
        reply, stopped, hard = self._stream(prompt)
        if hard:
            # Interrupted inside a forward pass: start the next turn from a fresh KV cache.
            self.cache = self.engine.new_cache()
        if reply or not stopped:
            self.history.append({"role": "assistant", "content": reply})
        else:
            self.history.pop()  # stopped before any text: as if the message had not been sent
        if stopped:
            kept = "the partial reply is kept" if reply else "your message was not kept"
            eprint(f"(reply stopped; {kept})")
        elif self.stats_after_reply and self.last_stats is not None:
            eprint(format_stats(self.last_stats))

    def _stream(self, prompt: list[int]) -> tuple[str, bool, bool]:
        """Stream a reply to stdout. The first Ctrl-C stops it after the current token; a
        second one interrupts at once. Returns (text, stopped, interrupted at once)."""
        state = {"stop": False}

        def on_sigint(signum, frame):
            if state["stop"]:
                raise KeyboardInterrupt
            state["stop"] = True

        parts: list[str] = []
        stream, stopped, hard = None, False, False
        self.last_stopped = False
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            stream = self.engine.stream(prompt, cache=self.cache, **self.kwargs)
            for r in stream:
                sys.stdout.write(r.text)
                sys.stdout.flush()
                parts.append(r.text)
                self.last_stats = r.stats
                if state["stop"]:
                    stopped = True
                    break
        except KeyboardInterrupt:
            stopped = hard = True
        finally:
            signal.signal(signal.SIGINT, previous)
            if stream is not None:
                stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
        if stopped and self.last_stats is not None and not self.last_stats.peak_rss_bytes:
            from ..utils import peak_rss_bytes

            self.last_stats.peak_rss_bytes = peak_rss_bytes()  # a stopped stream never filled it in
        self.last_stopped = stopped
        return "".join(parts), stopped, hard


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    if args.history is not None:
        check_output_path(args.history, "--history")
    interactive = sys.stdin.isatty()
    reader = LineReader(interactive, args.history)
    engine = load_engine(args)
    if engine.text2text is not None:  # each turn would re-encode the whole conversation as a new source
        engine.close()
        raise InvalidArgument(f"{engine.path}: edgemoe chat continues one conversation in a prompt cache, which an "
                              "encoder-decoder model cannot reuse; run it text-to-text with 'edgemoe generate -p'")
    chat = Chat(engine, kwargs, args.system, args.stats)
    if interactive:
        eprint(f"edgemoe chat: {engine.path} (context {engine.ctx_size} tokens)\n"
               "/help lists the commands; Ctrl-C stops a reply, Ctrl-D or /exit quits")
    try:
        with engine:
            while True:
                try:
                    text = reader.read()
                except KeyboardInterrupt:
                    if not interactive:
                        raise
                    sys.stdout.write("\n")  # Ctrl-C at the prompt drops the line being typed
                    continue
                if text is None:
                    break
                text = text.strip()
                if not text:
                    continue
                if text.startswith("/") and not text.startswith("//"):
                    if not chat.command(text):
                        break
                    continue
                chat.send(text[1:] if text.startswith("//") else text)
    finally:
        reader.save()
    return 0
