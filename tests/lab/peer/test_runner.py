"""One run in a (stand-in) cgroup: results, time limits, crashes, cleanup."""

import json
import sys
import textwrap

import pytest

from edgemoe_lab.peer import cgroup, runner

CHILD = textwrap.dedent("""
    import json, sys, time
    spec, result, progress = sys.argv[1:4]
    s = json.load(open(spec))
    json.dump({"phase": "decode", "tokens": 3, "decode_s": 2.0}, open(progress, "w"))
    if s["mode"] == "sleep":
        time.sleep(60)
    if s["mode"] == "fail":
        print("something broke", file=sys.stderr)
        sys.exit(3)
    sys.path.insert(0, s["children"])
    from _report import write_result
    write_result(result, {"ok": True, "status": "ok", "decode_tok_s": 5.0, "echo": s["x"]})
""")


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "memory"
    root.mkdir()
    (root / "memory.limit_in_bytes").write_text("0")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return cgroup.Controller(1, root), script, tmp_path / "tmp"


def launch(script, mode):
    return runner.Launch([sys.executable, str(script)], {"mode": mode, "x": 42, "children": str(runner.CHILDREN)})


def test_ok_run_reports_and_cleans_up(setup):
    ctl, script, tmp = setup
    out = runner.run(launch(script, "ok"), ctl=ctl, limit=10 << 20, timeout_s=60, tmp_root=tmp, drop=False)
    assert out["status"] == "ok" and out["echo"] == 42 and out["decode_tok_s"] == 5.0
    assert out["limit_bytes"] == 10 << 20 and out["proc_io"] is not None and "VmHWM" in out["proc_status"]
    assert list(ctl.root.iterdir()) == [ctl.root / "memory.limit_in_bytes"]  # the group is gone
    assert list(tmp.iterdir()) == []  # and the run's files


def test_time_limit(setup):
    ctl, script, tmp = setup
    out = runner.run(launch(script, "sleep"), ctl=ctl, limit=None, timeout_s=1.5, tmp_root=tmp, drop=False)
    assert out["status"] == "timeout" and "time limit of 2 s" in out["error"] and "3 tokens done" in out["error"]
    assert out["progress"]["tokens"] == 3 and out["wall_s"] < 30


def test_crash_is_reported(setup):
    ctl, script, tmp = setup
    out = runner.run(launch(script, "fail"), ctl=None, limit=None, timeout_s=60, tmp_root=tmp, drop=False)
    assert out["status"] == "error" and "exit status 3" in out["error"] and "something broke" in out["log_tail"]


def test_spec_is_passed_as_json(setup):
    ctl, script, tmp = setup
    out = runner.run(runner.Launch([sys.executable, "-c", "import json,sys; from pathlib import Path; "
                                    "Path(sys.argv[2]).write_text(json.dumps({'ok': True, 'n': len(json.load("
                                    "open(sys.argv[1]))['ids'])}))"], {"ids": [1, 2, 3]}),
                     ctl=None, limit=None, timeout_s=60, tmp_root=tmp, drop=False)
    assert out["status"] == "ok" and out["n"] == 3
    json.dumps(out)  # everything is serialisable
