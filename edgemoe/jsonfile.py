"""Reading a JSON file that a user gave us (config.json, tokenizer files, a manifest, a
safetensors index), with every failure a clean error naming the file.

One reader, so that a bad file fails the same way everywhere: bad UTF-8, bad JSON, a
5000-digit number or nesting deep enough to hit the recursion limit all become `error`,
never a traceback. Callers keep their own wording for what the file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], invalid: str = "invalid JSON: {e}",
              object_expected: str | None = "expected a JSON object") -> Any:
    """Parse `path`; failures raise `error("<path>: <message>")`. `invalid` words a parse
    failure ({e}: the parser's message); `object_expected` ({type}: the type found) is the
    message when the top level is not an object, or None to accept any JSON value."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
        raise error(f"{path}: " + invalid.format(e=e)) from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if object_expected is not None and not isinstance(data, dict):
        raise error(f"{path}: " + object_expected.format(type=type(data).__name__))
    return data
