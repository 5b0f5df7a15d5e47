"""The lab stays outside the engine: no module of edgemoe imports edgemoe_lab except the
`edgemoe bench` command (train-tiny is named by a string in the command table), and no
module of the lab imports the tests. Read from the source; nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_MAY_IMPORT_LAB = {"edgemoe/cli/bench.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, function bodies included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_the_engine_does_not_import_the_lab():
    offenders = []
    for path in sorted((ROOT / "edgemoe").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ENGINE_MAY_IMPORT_LAB:
            continue
        if any(m == "edgemoe_lab" or m.startswith("edgemoe_lab.") for m in imported_modules(path)):
            offenders.append(rel)
    assert offenders == []


def test_the_lab_does_not_import_the_tests():
    offenders = []
    for path in sorted((ROOT / "edgemoe_lab").rglob("*.py")):
        if "work" in path.relative_to(ROOT / "edgemoe_lab").parts:
            continue  # scratch space
        names = imported_modules(path)
        reaches_in = re.search(r"sys\.path.*tests", path.read_text())  # e.g. sys.path.insert(0, ROOT / "tests")
        if any(m in ("conftest", "tests") or m.startswith("tests.") for m in names) or reaches_in:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
