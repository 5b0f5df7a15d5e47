"""`edgemoe convert --force` never leaves a model only in a hidden directory: stopped at
any step of replacing OUT (an exception, or a real kill -9), OUT is the old model or the
new one, or is missing with the old one put back by the next conversion; and the next
conversion leaves nothing hidden behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.store import convert as conv
from edgemoe.store.convert import convert, interrupted, recover
from edgemoe.store.manifest import read_manifest

from cli.helpers import run_cli
from store.helpers import make_checkpoint

OLD, NEW = "float32", "bfloat16"  # the old model and its replacement differ in dtype
# Where each way of replacing OUT can be stopped, and what OUT holds right then.
EXCHANGE_STEPS = {"complete": OLD, "exchanged": NEW, "trash": NEW}
FALLBACK_STEPS = {"complete": OLD, "set-aside": None, "renamed": NEW, "trash": NEW}


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("swap") / "hf", "mixtral", tokenizer_dir)


@pytest.fixture(scope="module")
def old_model(hf, tmp_path_factory):
    return convert(hf, tmp_path_factory.mktemp("old") / "m", dtype=OLD).out


def fresh_old(old_model: Path, parent: Path) -> Path:
    import shutil

    parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(old_model, parent / "out")
    return parent / "out"


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def holds(out: Path) -> str:
    """The dtype of the model in `out`, after checking that it loads and generates."""
    m = read_manifest(out)
    with edgemoe.load(out, memory=None) as engine:
        assert len(engine.generate([0, 5, 9], max_tokens=2, ignore_eos=True).token_ids) == 2
    return m.dtype


def test_exchange_is_atomic_here(tmp_path):
    """The swap this machine uses: both entries trade places in one step."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not conv._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system or file system")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


class Stop(BaseException):
    pass


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_exception_at_each_step_leaves_old_or_new(hf, old_model, tmp_path, monkeypatch, exchange):
    """An exception (e.g. Ctrl-C) at any step: OUT is the old or the new model, never missing."""
    steps = EXCHANGE_STEPS if exchange else FALLBACK_STEPS
    if not exchange:
        monkeypatch.setattr(conv, "_exchange", lambda a, b: False)
    for step, expected in steps.items():
        parent = tmp_path / step
        out = fresh_old(old_model, parent)

        def stop(at, step=step):
            if at == step:
                raise Stop(at)

        monkeypatch.setattr(conv, "_crash_point", stop)
        with pytest.raises(Stop):
            convert(hf, out, dtype=NEW, force=True)
        assert holds(out) == (expected or OLD), step  # set-aside: the old model was put back at once
        monkeypatch.setattr(conv, "_crash_point", lambda at: None)
        convert(hf, out, dtype=NEW, force=True)
        assert holds(out) == NEW and hidden(parent) == [], step


CHILD = textwrap.dedent("""
    import sys, time
    from edgemoe.store import convert as conv
    src, out, step, mode = sys.argv[1:]
    if mode == "fallback":
        conv._exchange = lambda a, b: False

    def stop(at):
        if at == step:
            print("at", at, flush=True)
            time.sleep(600)  # killed here by the test

    conv._crash_point = stop
    conv.convert(src, out, dtype="bfloat16", force=True)
    print("finished", flush=True)
""")


def test_kill_9_at_each_step(hf, old_model, tmp_path):
    """A real SIGKILL of a converting process at each step of the swap, both ways of
    swapping: OUT is the old or the new model (or, killed between the two renames of the
    fallback, missing with the old one restored by the next conversion), always valid,
    and the next conversion leaves nothing hidden."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cases = [(mode, step, expected) for mode, steps in (("exchange", EXCHANGE_STEPS), ("fallback", FALLBACK_STEPS))
             for step, expected in steps.items()]
    procs = {}
    for mode, step, _ in cases:  # all at once: each child spends most of its time importing
        out = fresh_old(old_model, tmp_path / f"{mode}-{step}")
        procs[(mode, step)] = subprocess.Popen([sys.executable, str(script), str(hf), str(out), step, mode],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for mode, step, expected in cases:
        proc, parent = procs[(mode, step)], tmp_path / f"{mode}-{step}"
        out = parent / "out"
        line = proc.stdout.readline()  # blocks until the child is at the step (or ends)
        assert line.strip() == f"at {step}", (line, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        where = f"{mode} killed at {step}"
        if expected is None:  # between the renames: OUT missing, the old model hidden
            assert not out.exists(), where
            assert interrupted(out) is not None and interrupted(out).name == f".out.old-{proc.pid}", where
            with pytest.raises(EdgeMoEError, match=f"killed while replacing it.*\\.out\\.old-{proc.pid}"):
                edgemoe.load(out)  # the loader names where the previous model is
            with pytest.raises(EdgeMoEError, match="already exists.*restored"):
                convert(hf, out, dtype=NEW)  # without --force: the old model is put back, then kept
            assert holds(out) == OLD and hidden(parent) == [], where
        else:
            assert holds(out) == expected, where
            assert interrupted(out) is None, where
        # The next conversion replaces it and leaves nothing hidden.
        r = convert(hf, out, dtype=NEW, force=True)
        assert r.recovered == [] and holds(out) == NEW and hidden(parent) == [], where


def test_cli_restores_and_reports(hf, old_model, tmp_path):
    """Debris as a killed fallback swap leaves it: the CLI restores the old model, says
    so, converts, and removes every hidden directory of dead processes."""
    parent = tmp_path / "p"
    out = fresh_old(old_model, parent)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.rename(out, parent / f".out.old-{dead}")
    (parent / f".out.partial-{dead}").mkdir()  # the new model, half written
    (parent / f".out.trash-{dead}").mkdir()
    proc = run_cli("convert", hf, out, "--force", "--dtype", NEW)
    assert proc.returncode == 0, proc.stderr
    assert f"restored {out} from .out.old-{dead}" in proc.stderr
    assert holds(out) == NEW and hidden(parent) == []


def test_live_conversions_are_left_alone(hf, old_model, tmp_path):
    """Hidden directories of a process that is still running are not touched."""
    parent = tmp_path / "p"
    out = fresh_old(old_model, parent)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (parent / f".out.partial-{sleeper.pid}").mkdir()
        assert recover(out) == []
        assert hidden(parent) == [f".out.partial-{sleeper.pid}"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert recover(out) == [] and hidden(parent) == []


def test_output_that_is_a_file_is_refused(hf, tmp_path):
    (tmp_path / "out").write_text("not a model")
    with pytest.raises(EdgeMoEError, match="exists and is not a directory"):
        convert(hf, tmp_path / "out", force=True)
    assert (tmp_path / "out").read_text() == "not a model" and hidden(tmp_path) == []


def test_output_parent_not_a_directory(hf, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeMoEError, match="file: cannot create the output's parent directory"):
        convert(hf, tmp_path / "file" / "out")


def test_write_error_is_a_clean_error_and_leaves_old_model(hf, old_model, tmp_path, monkeypatch):
    """A full disk while writing: one message naming the file, the old model untouched."""
    out = fresh_old(old_model, tmp_path / "p")

    def full(path, *a, **k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(conv, "write_tensors", full)
    with pytest.raises(EdgeMoEError, match=r"resident.safetensors: No space left on device; the conversion .* abandoned"):
        convert(hf, out, dtype=NEW, force=True)
    assert holds(out) == OLD and hidden(tmp_path / "p") == []
