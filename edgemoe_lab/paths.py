"""Where the lab reads and writes: the repository checkout, the recorded results and the
experiments' scratch space. The lab runs from a checkout (`pip install -e .`), so these
are paths in it."""

from __future__ import annotations

from pathlib import Path

LAB = Path(__file__).resolve().parent
ROOT = LAB.parent  # the repository checkout
RESULTS = LAB / "results"
WORK = LAB / "work"  # git-ignored
