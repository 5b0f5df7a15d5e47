"""The cgroup helper on a stand-in hierarchy (a temporary directory laid out like one)."""

import os
import subprocess
import sys

import pytest

from edgemoe_lab.peer import cgroup


@pytest.fixture
def v1_root(tmp_path):
    root = tmp_path / "memory"
    root.mkdir()
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return root


def test_detect_v1(v1_root, tmp_path):
    ctl, why = cgroup.detect(v1_root, (tmp_path / "none",), need_root=False)
    assert ctl == cgroup.Controller(1, v1_root) and why == ""


def test_detect_reports_why_there_is_none(tmp_path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io pids\n")
    ctl, why = cgroup.detect(tmp_path / "memory", (v2,), need_root=False)
    assert ctl is None and "no memory controller" in why
    ctl, why = cgroup.detect(tmp_path / "memory", (tmp_path / "nothing",), need_root=False)
    assert ctl is None and "no cgroup memory controller is mounted" in why


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the message for non-root users")
def test_detect_needs_root(v1_root):
    ctl, why = cgroup.detect(v1_root)
    assert ctl is None and "not running as root" in why


def test_create_limit_join_measure_remove(v1_root):
    ctl = cgroup.Controller(1, v1_root)
    cg = cgroup.MemoryCgroup.create(ctl, "edgemoe-bench-1-1", 123_456_789)
    assert (cg.path / "memory.limit_in_bytes").read_text() == "123456789"
    proc = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=cg.join_self)
    proc.wait()
    assert cg.pids() == [proc.pid]  # the child wrote itself in before exec
    (cg.path / "memory.max_usage_in_bytes").write_text("1000\n")
    (cg.path / "memory.failcnt").write_text("7\n")
    (cg.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.peak_bytes() == 1000 and cg.limit_hits() == 7 and cg.oom_kills() == 2
    cg.remove()
    assert not cg.path.exists()


def test_v2_files(tmp_path):
    ctl = cgroup.Controller(2, tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "memory.swap.max").write_text("max\n")
    cg = cgroup.MemoryCgroup(ctl, tmp_path / "x", None)
    cg._set_limit(5000)
    assert (cg.path / "memory.max").read_text() == "5000" and (cg.path / "memory.swap.max").read_text() == "0"
    (cg.path / "memory.peak").write_text("4096\n")
    (cg.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.peak_bytes() == 4096 and cg.limit_hits() == 3 and cg.oom_kills() == 1
    with cg:
        pass
    assert not cg.path.exists()


def test_no_limit_writes_nothing(v1_root):
    with cgroup.MemoryCgroup.create(cgroup.Controller(1, v1_root), "edgemoe-bench-1-2", None) as cg:
        assert not (cg.path / "memory.limit_in_bytes").exists()
        assert cg.peak_bytes() is None


def test_remove_stale_keeps_live_owners(v1_root):
    ctl = cgroup.Controller(1, v1_root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (v1_root / f"edgemoe-bench-{dead.pid}-1").mkdir()
    (v1_root / f"edgemoe-bench-{os.getppid()}-1").mkdir()  # a live owner: another benchmark
    (v1_root / "someone-else").mkdir()
    removed = cgroup.remove_stale(ctl)
    assert removed == [f"edgemoe-bench-{dead.pid}-1"]
    assert (v1_root / f"edgemoe-bench-{os.getppid()}-1").exists() and (v1_root / "someone-else").exists()
