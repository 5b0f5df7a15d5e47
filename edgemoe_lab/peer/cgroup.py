"""Memory cgroups for benchmark runs (cgroup v1 or v2; root only).

    ctl, why = detect()                      # ctl is None where the machine does not allow it
    with MemoryCgroup.create(ctl, "edgemoe-bench-123-4", limit_bytes) as cg:
        proc = subprocess.Popen(cmd, preexec_fn=cg.join_self)   # joins before exec
        ...
        cg.peak_bytes(), cg.oom_kills()
    # on exit: every process left in the group is killed and the directory removed

The limit covers everything the kernel charges to the group: anonymous memory and the
page cache of the files its processes read, so a program that maps its weights file
(llama.cpp) thrashes once the file no longer fits, while reads with O_DIRECT (edgemoe's
expert store) are not cached at all. Swap is limited to the same value (no swap on top).

`root` can be any directory laid out like a cgroup hierarchy, which is how the tests
exercise this module without privileges.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.utils import pid_alive

PREFIX = "edgemoe-bench-"
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class CgroupError(Exception):
    pass


@dataclass(frozen=True)
class Controller:
    version: int  # 1 or 2
    root: Path

    def describe(self) -> str:
        return f"cgroup v{self.version} memory controller at {self.root}"


def detect(v1_root: Path = V1_ROOT, v2_roots=V2_ROOTS, need_root: bool = True) -> tuple[Controller | None, str]:
    """The memory controller to use, or (None, the reason there is none)."""
    if need_root and os.geteuid() != 0:
        return None, f"not running as root (uid {os.geteuid()}): memory cgroups cannot be created"
    reasons = []
    if (v1_root / "memory.limit_in_bytes").exists():
        if os.access(v1_root, os.W_OK):
            return Controller(1, v1_root), ""
        reasons.append(f"{v1_root} is not writable")
    for r in v2_roots:
        ctl = r / "cgroup.controllers"
        if ctl.exists():
            if "memory" not in ctl.read_text().split():
                reasons.append(f"{r} (cgroup v2) has no memory controller")
                continue
            sub = (r / "cgroup.subtree_control")
            if "memory" not in sub.read_text().split():
                try:
                    sub.write_text("+memory")
                except OSError as e:
                    reasons.append(f"cannot enable the memory controller in {sub}: {e.strerror}")
                    continue
            if os.access(r, os.W_OK):
                return Controller(2, r), ""
            reasons.append(f"{r} is not writable")
    if not reasons:
        reasons.append(f"no cgroup memory controller is mounted ({v1_root} or {' / '.join(map(str, v2_roots))})")
    return None, "; ".join(reasons)


class MemoryCgroup:
    """One memory cgroup directory."""

    def __init__(self, ctl: Controller, path: Path, limit: int | None):
        self.ctl, self.path, self.limit = ctl, path, limit

    @classmethod
    def create(cls, ctl: Controller, name: str, limit: int | None) -> "MemoryCgroup":
        """Make the directory and set the limit (None: no limit, measurement only)."""
        path = ctl.root / name
        path.mkdir()
        cg = cls(ctl, path, limit)
        try:
            if limit is not None:
                cg._set_limit(int(limit))
        except BaseException:
            cg.remove()
            raise
        return cg

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            raise CgroupError(f"{self.path / name}: cannot write {value!r}: {e.strerror}") from None

    def _set_limit(self, limit: int) -> None:
        if self.ctl.version == 1:
            self._write("memory.limit_in_bytes", str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swapping around it
                self._write("memory.memsw.limit_in_bytes", str(limit))
        else:
            self._write("memory.max", str(limit))
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", "0")

    # -- membership ---------------------------------------------------------------------
    def join_self(self) -> None:
        """Move the calling process into the group (use as Popen's preexec_fn: the child
        joins after fork and before exec, so everything it loads is charged here)."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    # -- measurements -------------------------------------------------------------------
    def _read_int(self, name: str) -> int | None:
        try:
            text = (self.path / name).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    def _read_keyed(self, name: str) -> dict[str, int]:
        try:
            lines = (self.path / name).read_text().splitlines()
        except OSError:
            return {}
        out = {}
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def peak_bytes(self) -> int | None:
        """Highest memory charged to the group (anonymous memory plus page cache)."""
        return self._read_int("memory.max_usage_in_bytes" if self.ctl.version == 1 else "memory.peak")

    def usage_bytes(self) -> int | None:
        return self._read_int("memory.usage_in_bytes" if self.ctl.version == 1 else "memory.current")

    def limit_hits(self) -> int | None:
        """How often usage reached the limit (v1 failcnt; v2 'max' events)."""
        if self.ctl.version == 1:
            return self._read_int("memory.failcnt")
        return self._read_keyed("memory.events").get("max")

    def oom_kills(self) -> int | None:
        key = "oom_kill"
        d = self._read_keyed("memory.oom_control" if self.ctl.version == 1 else "memory.events")
        return d.get(key)

    def stat(self) -> dict[str, int]:
        return self._read_keyed("memory.stat")

    # -- teardown -----------------------------------------------------------------------
    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the group and wait until it is empty."""
        if self._is_fake():  # a stand-in directory lists pids that may long be gone: never signal them
            (self.path / "cgroup.procs").write_text("")
            return
        deadline = time.monotonic() + timeout
        if self.ctl.version == 2 and (self.path / "cgroup.kill").exists():
            try:
                (self.path / "cgroup.kill").write_text("1")
            except OSError:
                pass
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path}: processes {pids} survive SIGKILL")
            time.sleep(0.05)

    def remove(self) -> None:
        """Kill what is left inside and remove the directory (retrying while the kernel
        finishes tearing the processes down)."""
        if not self.path.exists():
            return
        self.kill_all()
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if self._is_fake():
                    self._rm_fake()
                    return
                time.sleep(0.05)
        raise CgroupError(f"{self.path}: could not be removed")

    def _is_fake(self) -> bool:
        """A plain directory standing in for a cgroup (tests): its files are real files."""
        return not str(self.path).startswith("/sys/fs/cgroup")

    def _rm_fake(self) -> None:
        for f in self.path.iterdir():
            f.unlink()
        self.path.rmdir()

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def remove_stale(ctl: Controller) -> list[str]:
    """Remove groups left by benchmarks that died (their owner pid, in the name, is gone).
    Groups of a benchmark still running are left alone. Returns the names removed."""
    removed = []
    for d in sorted(ctl.root.glob(PREFIX + "*")):
        try:
            owner = int(d.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        try:
            MemoryCgroup(ctl, d, None).remove()
            removed.append(d.name)
        except (CgroupError, OSError):
            pass
    return removed
