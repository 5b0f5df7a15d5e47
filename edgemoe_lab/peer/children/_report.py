"""What every benchmark child reports about itself, from the Python standard library only
(children run under different interpreters: edgemoe's, or the peers' environment)."""

from __future__ import annotations

import json
import os
import time


def proc_io(pid: str | int = "self") -> dict:
    """/proc/PID/io: read_bytes is what the process made the block layer read (page-cache
    misses, mmap faults and O_DIRECT reads alike); rchar counts every read() call."""
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except (OSError, ValueError):
        pass
    return out


def proc_status(pid: str | int = "self") -> dict:
    """Peak and current memory from /proc/PID/status, in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class Progress:
    """Writes how far the run got to a small JSON file after every token, so that a run
    stopped by its time limit still tells its rate so far."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {"phase": "load", "t_start": time.time()}
        self._flush()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self._flush()

    def _flush(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def load_spec(argv: list[str]) -> tuple[dict, str, str | None]:
    """Children are called as `python CHILD.py SPEC.json RESULT.json [PROGRESS.json]`."""
    if len(argv) < 2:
        raise SystemExit("usage: CHILD SPEC.json RESULT.json [PROGRESS.json]")
    with open(argv[0]) as f:
        spec = json.load(f)
    return spec, argv[1], (argv[2] if len(argv) > 2 else None)


def write_result(path: str, result: dict) -> None:
    """The result with the process's own I/O and memory counters, taken right before exit."""
    result = dict(result)
    result["proc_io"] = proc_io()
    result["proc_status"] = proc_status()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def timing_fields(prompt_tokens: int, generated: int, prefill_s: float, decode_s: float) -> dict:
    """The same definitions for every engine: prefill = the prompt's forward pass up to the
    first generated token; decode = each later token's forward pass (generated - 1 of them)."""
    n = generated - 1
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prefill_s": round(prefill_s, 6),
        "decode_s": round(decode_s, 6),
        "prefill_tok_s": round(prompt_tokens / prefill_s, 4) if prefill_s > 0 else None,
        "decode_tok_s": round(n / decode_s, 4) if n > 0 and decode_s > 0 else None,
    }


def context_size(prompt_tokens: int, new_tokens: int) -> int:
    """The context window every engine gets for a run: the prompt plus the generated
    tokens, rounded up to a multiple of 256 (llama.cpp's n_ctx; edgemoe's ctx_size), so
    neither engine reserves memory for a longer context than the other."""
    return (prompt_tokens + new_tokens + 255) // 256 * 256

