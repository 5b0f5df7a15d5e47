"""`edgemoe chat` in a pseudo-terminal, as a person uses it (issue 17, section 5): line
editing and history, Ctrl-C at the prompt and during a reply, Ctrl-D, slash commands."""

from __future__ import annotations

import io
import json
import os
import sys
import time

import pytest

from edgemoe.cli.info import model_info

pexpect = pytest.importorskip("pexpect")

LEFT, UP = "\x1b[D", "\x1b[A"
CTRL_C, CTRL_D = "\x03", "\x04"
PROMPT = ">>> "


def spawn_chat(tmp_path, *args: str) -> "pexpect.spawn":
    env = dict(os.environ, TERM="xterm", HOME=str(tmp_path), INPUTRC=os.devnull, PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "edgemoe", "chat", *args], env=env, encoding="utf-8",
                          timeout=90, dimensions=(40, 200))
    child.logfile_read = io.StringIO()  # the whole session, for the checks at the end
    child.expect_exact(PROMPT)
    return child


def saved(path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


def test_line_editing_history_commands_and_ctrl_d(tmp_path):
    child = spawn_chat(tmp_path, "--max-tokens", "6", "--temperature", "0", "--ignore-eos")
    try:
        child.send("abc" + LEFT + LEFT + "X\r")  # edited in place: "aXbc"
        child.expect_exact(PROMPT)
        child.send(UP + "\r")  # the up arrow recalls the last line
        child.expect_exact(PROMPT)
        child.send("typed but dropped" + CTRL_C)  # Ctrl-C at the prompt clears the line
        child.expect_exact(PROMPT)
        child.send("/he\t\r")  # Tab completes commands
        child.expect_exact("/load FILE")
        child.expect_exact(PROMPT)
        child.sendline("/frobnicate")
        child.expect_exact("unknown command /frobnicate")
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"conversation: 4 messages \| context: \d+ of 256 tokens")
        child.expect(r"decode: 6 tokens")
        child.expect_exact(PROMPT)
        bad = tmp_path / "bad.json"
        bad.write_text('[{"role": "tool", "content": "x"}]')
        child.sendline(f"/load {bad}")
        child.expect_exact(f"/load failed: {bad}: message 1: role must be one of system, user, assistant")
        child.expect_exact(PROMPT)
        out = tmp_path / "chat.json"
        child.sendline(f"/save {out}")
        child.expect_exact(f"saved 4 messages to {out}")
        child.expect_exact(PROMPT)
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
        assert "\n" in child.before  # Ctrl-D ends the prompt's line
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.logfile_read.getvalue()
    messages = saved(out)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["content"] for m in messages[::2]] == ["aXbc", "aXbc"]
    assert all(m["content"] for m in messages[1::2])


def test_load_continues_a_saved_conversation(tmp_path):
    conv = tmp_path / "in.json"
    conv.write_text(json.dumps({"messages": [{"role": "system", "content": "You write Python."},
                                             {"role": "user", "content": "def add(a, b):"},
                                             {"role": "assistant", "content": "return a + b"}]}))
    child = spawn_chat(tmp_path, "--max-tokens", "4", "--temperature", "0", "--ignore-eos")
    try:
        child.sendline(f"/load {conv}")
        child.expect_exact(f"loaded 2 messages from {conv}")
        child.expect_exact(PROMPT)
        child.sendline("and subtract?")
        child.expect_exact(PROMPT)
        out = tmp_path / "out.json"
        child.sendline(f"/save {out}")
        child.expect_exact("saved 5 messages")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    messages = saved(out)
    assert messages[:3] == json.loads(conv.read_text())["messages"]
    assert messages[3] == {"role": "user", "content": "and subtract?"}


@pytest.mark.parametrize("presses", [1, 2], ids=["after-the-token", "at-once"])
def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tmp_path, converted_bundled, presses):
    # A read throttle and the smallest budget (a cache of one layer's experts: every token
    # reads) make each token take a fraction of a second, so the reply is still running
    # when Ctrl-C arrives.
    least = model_info(converted_bundled)["memory"]["min_budget_bytes"]
    child = spawn_chat(tmp_path, str(converted_bundled), "--memory", str(least), "--read-throttle", "20MB/s",
                       "--no-prefetch", "--max-tokens", "120", "--ignore-eos", "--temperature", "0")
    try:
        child.sendline("def add(a, b):")
        child.expect_exact("def add(a, b):\r\n")  # the echo of the line
        child.expect(r"\S")  # the reply has started
        t0 = time.perf_counter()
        child.send(CTRL_C * presses)
        child.expect_exact("(reply stopped; the partial reply is kept)")
        assert time.perf_counter() - t0 < 30
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"decode: (\d+) tokens")
        assert int(child.match.group(1)) < 120
        child.expect_exact(PROMPT)
        child.sendline("hello")  # the conversation goes on
        child.expect_exact("hello\r\n")
        child.expect(r"\S")
        child.send(CTRL_C)
        child.expect_exact("reply stopped")
        child.expect_exact(PROMPT)
        out = tmp_path / "chat.json"
        child.sendline(f"/save {out}")
        child.expect_exact("saved 4 messages")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    messages = saved(out)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "def add(a, b):" and messages[2]["content"] == "hello"
    assert messages[1]["content"].strip() and messages[3]["content"].strip()
    assert "Traceback" not in child.logfile_read.getvalue()


def test_history_file_is_kept_across_sessions(tmp_path):
    history = tmp_path / "history"
    child = spawn_chat(tmp_path, "--history", str(history), "-n", "2", "--temperature", "0")
    try:
        child.sendline("/stats")
        child.expect_exact("no reply yet")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert "/stats" in history.read_text()
    child = spawn_chat(tmp_path, "--history", str(history), "-n", "2", "--temperature", "0")
    try:
        child.send(UP + UP + "\r")  # /exit, then /stats from the last session
        child.expect_exact("no reply yet")
        child.expect_exact(PROMPT)
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
