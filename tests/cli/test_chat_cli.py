"""`edgemoe chat` with piped input: the slash commands and the checks on /load (issue 17,
section 5). The terminal behaviour is in test_chat_pty.py."""

from __future__ import annotations

import json

from edgemoe.cli.chat import read_conversation

from .helpers import run_cli

BAD_FILES = {
    "bad_json.json": ('{"messages": [', "not valid JSON"),
    "not_utf8.json": (b"\xff\xfe[]", "not valid UTF-8"),
    "role.json": ('[{"role": "tool", "content": "x"}]', "message 1: role must be one of system, user, assistant"),
    "content.json": ('[{"role": "user", "content": 5}]', "message 1: content must be a string, got int"),
    "system_late.json": ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
                         "message 2: a system message may only come first"),
    "not_list.json": ('{"messages": "hello"}', '"messages" must be a list'),
    "no_messages.json": ('{"conversation": []}', 'no "messages" key'),
    "other_format.json": ('{"format": "pickle", "messages": []}', "format 'pickle' is not 'edgemoe-chat'"),
    "version.json": ('{"format": "edgemoe-chat", "version": 9, "messages": []}', "conversation version 9"),
}


def test_load_refuses_bad_files_and_the_chat_goes_on(tmp_path):
    lines = []
    for name, (content, _) in BAD_FILES.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        lines.append(f"/load {path}")
    out = tmp_path / "saved.json"
    lines += [f"/load {tmp_path / 'missing.json'}", "/load", f"/save {tmp_path / 'no' / 'dir.json'}",
              "hello", f"/save {out}", "/stats", "/reset", "/stats", "/exit", "never sent"]
    proc = run_cli("chat", "-n", "3", "--temperature", "0", "--ignore-eos", "--system", "Be brief.",
                   input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name, (_, message) in BAD_FILES.items():
        assert f"(/load failed: {tmp_path / name}: {message}" in proc.stderr, (name, proc.stderr)
    assert "missing.json: no such file" in proc.stderr and "(/load needs a file name" in proc.stderr
    assert "(/save failed: /save" in proc.stderr and "does not exist" in proc.stderr
    saved = json.loads(out.read_text())
    assert saved["format"] == "edgemoe-chat" and saved["version"] == 1
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert proc.stderr.count("conversation: 2 messages + a system message") == 1  # /stats before /reset
    assert "conversation: 0 messages + a system message" in proc.stderr and "no reply yet" in proc.stderr
    assert read_conversation(str(out)) == saved["messages"]  # what /save writes, /load reads


def test_continuation_lines_and_slash_escape(tmp_path):
    out = tmp_path / "c.json"
    proc = run_cli("chat", "-n", "2", "--temperature", "0", "--ignore-eos",
                   input=f"def add(a, b):\\\n    return a + b\n//not a command\n/save {out}\n")
    assert proc.returncode == 0, proc.stderr
    users = [m["content"] for m in json.loads(out.read_text())["messages"] if m["role"] == "user"]
    assert users == ["def add(a, b):\n    return a + b", "/not a command"]


def test_openai_style_message_lists_load(tmp_path):
    f = tmp_path / "req.json"
    f.write_text(json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}))
    assert read_conversation(str(f)) == [{"role": "user", "content": "hi"}]
