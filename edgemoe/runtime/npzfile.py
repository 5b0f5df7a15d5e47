"""The file container of routing traces (trace.py) and fitted predictors
(predictor_stats.py): numpy's zip of plain arrays, one of them `header`, a uint8 array
of JSON that names the file's format and version. Files are written atomically and read
with allow_pickle=False, so a file can hold data but never code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..utils import save_npz_atomic


def save_npz(path: str | Path, header: dict, arrays: dict) -> None:
    """Write `header` and `arrays` atomically (a temporary file, then a rename)."""
    save_npz_atomic(path, {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays})


def load_npz(path: str | Path, *, what: str, noun: str, fmt: str, versions: tuple[int, ...], required: set[str],
             optional: set[str] = frozenset(), error: type[EdgeMoEError] = EdgeMoEError,
             hint: str = "") -> tuple[dict, dict]:
    """The header and arrays of a `what` file ("routing trace"), checked this far: it is a
    regular file, a readable zip of plain arrays holding `header` and every `required`
    array, and its header is a JSON object naming format `fmt` and one of `versions`.
    Returns (header, arrays) with the `required` arrays and those `optional` ones present.
    Every failure raises `error` naming the file; `hint` (say, "; fit one with ...") ends
    the messages about a missing file. `noun` names the version ("trace version 3")."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found{hint}")
    if not path.is_file():  # a directory or a named pipe (which would block the read forever)
        raise error(f"{path}: not a regular file{hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not {"header"} | required <= files:
                raise error(f"{path}: not an edgemoe {what} (arrays: {', '.join(sorted(files))})")
            header = json.loads(z["header"].tobytes().decode())
            arrays = {name: z[name] for name in sorted((required | optional) & files)}
    except error:
        raise
    except Exception as e:  # zip, npy and JSON errors all mean an unusable file
        raise error(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise error(f"{path}: not an edgemoe {what}")
    if header.get("version") not in versions:
        raise error(f"{path}: {noun} version {header.get('version')!r} is not supported "
                    f"(expected {' or '.join(map(str, versions))})")
    return header, arrays
