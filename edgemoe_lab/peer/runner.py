"""One engine run: a child process in a fresh memory cgroup, with a time limit.

The page cache is dropped first (so every run starts cold and no run profits from the
previous one's reads), the child joins its cgroup between fork and exec (so everything
it loads is charged there), /proc/PID/io is sampled while it runs (for runs that do not
get to report it themselves), and whatever happens the cgroup and the temporary files
are removed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import cgroup as cg_mod
from .children._report import proc_io
from .machine import drop_caches, loadavg

CHILDREN = Path(__file__).resolve().parent / "children"
_counter = itertools.count(1)


@dataclass
class Launch:
    """What to run: `argv` gets SPEC.json RESULT.json PROGRESS.json appended."""

    argv: list[str]
    spec: dict
    env: dict | None = None


def child_script(name: str) -> str:
    return str(CHILDREN / name)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace")


def run(launch: Launch, *, ctl: cg_mod.Controller | None, limit: int | None, timeout_s: float, tmp_root: Path,
        drop: bool = True, log=None) -> dict:
    """Run once; returns the measurements (always a dict with a `status`)."""
    n = next(_counter)
    tmp = Path(tmp_root) / f"run-{os.getpid()}-{n}"
    tmp.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, progress_path = tmp / "spec.json", tmp / "result.json", tmp / "progress.json"
    log_path = tmp / "child.log"
    spec_path.write_text(json.dumps(launch.spec))
    out: dict = {"limit_bytes": limit, "cgroup": ctl.describe() if ctl else None}
    group = None
    proc = None
    try:
        out["page_cache_dropped"] = drop_caches() if drop else False
        out["loadavg_before"] = loadavg()
        if ctl is not None:
            group = cg_mod.MemoryCgroup.create(ctl, f"{cg_mod.PREFIX}{os.getpid()}-{n}", limit)
        env = dict(os.environ)
        env.update(launch.env or {})
        t0 = time.perf_counter()
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [*launch.argv, str(spec_path), str(result_path), str(progress_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                preexec_fn=group.join_self if group else None, start_new_session=True,
            )
            io_seen: dict = {}
            timed_out = False
            while proc.poll() is None:
                sample = proc_io(proc.pid)
                if sample:
                    io_seen = sample
                if time.perf_counter() - t0 > timeout_s:
                    timed_out = True
                    _kill(proc, group)
                    break
                time.sleep(0.25)
            proc.wait()
        out["wall_s"] = round(time.perf_counter() - t0, 3)
        out["returncode"] = proc.returncode
        if group is not None:
            out["cgroup_peak_bytes"] = group.peak_bytes()
            out["limit_hits"] = group.limit_hits()
            out["oom_kills"] = group.oom_kills()
        result = None
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except ValueError:
                result = None
        progress = {}
        if progress_path.exists():
            try:
                progress = json.loads(progress_path.read_text())
            except ValueError:
                pass
        if result is not None:
            out.update(result)
            out.setdefault("status", "ok" if result.get("ok") else "error")
        else:
            out["ok"] = False
            out["proc_io"] = io_seen
            out["progress"] = progress
            if timed_out:
                out["status"] = "timeout"
                out["error"] = f"stopped after the time limit of {timeout_s:.0f} s ({_progress_text(progress)})"
            elif out.get("oom_kills") or proc.returncode == -signal.SIGKILL:
                out["status"] = "oom"
                out["error"] = (f"killed by the kernel's OOM killer inside the {limit} byte cgroup "
                                f"({_progress_text(progress)})" if out.get("oom_kills")
                                else f"killed (SIGKILL; {_progress_text(progress)})")
            else:
                out["status"] = "error"
                out["error"] = f"exit status {proc.returncode}: {_tail(log_path, 600).strip()[-600:]}"
        if out["status"] != "ok":
            out["log_tail"] = _tail(log_path)
        return out
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc, group)
        if group is not None:
            try:
                group.remove()
            except cg_mod.CgroupError as e:
                out["cleanup_error"] = str(e)
        shutil.rmtree(tmp, ignore_errors=True)


def _progress_text(p: dict) -> str:
    if not p:
        return "no progress reported"
    phase = p.get("phase", "?")
    if phase == "decode":
        return f"in decode, {p.get('tokens', 0)} tokens done"
    return f"in {phase}"


def _kill(proc: subprocess.Popen, group) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if group is not None:
        try:
            group.kill_all()
        except cg_mod.CgroupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
