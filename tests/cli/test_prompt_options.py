"""--prompt-file, --chat-template and the checks around the prompt (issue 17, sections 6 and 8)."""

from __future__ import annotations

import json

import edgemoe

from .helpers import assert_clean_error, run_cli


def prompt_tokens(proc) -> int:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["stats"]["prompt_tokens"]


def test_prompt_file(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("def quicksort(items):\n")  # as an editor saves it: the final newline is dropped
    from_file = run_cli("generate", "--prompt-file", f, "-n", "4", "--ignore-eos", "--json")
    given = run_cli("generate", "--prompt", "def quicksort(items):", "-n", "4", "--ignore-eos", "--json")
    assert json.loads(from_file.stdout)["token_ids"] == json.loads(given.stdout)["token_ids"]
    f.write_text("x = 1\n\n")  # only one newline goes
    e = edgemoe.load()
    assert prompt_tokens(run_cli("generate", "-f", f, "-n", "1", "--json")) == len(e.tokenize("x = 1\n"))
    e.close()


def test_prompt_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    assert_clean_error(run_cli("generate", "-f", tmp_path / "missing.txt"), "--prompt-file", "missing.txt: no such file")
    assert_clean_error(run_cli("generate", "-f", tmp_path), "is a directory")
    assert_clean_error(run_cli("generate", "-f", tmp_path / "empty.txt"), "the file is empty")
    assert_clean_error(run_cli("generate", input=""), "the prompt is empty", "--prompt-file")
    proc = run_cli("generate", "-p", "x", "-f", tmp_path / "empty.txt")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr  # argparse: one or the other
    assert_clean_error(run_cli("generate", "-p", "x", "--system", "be brief"), "--system is used only with --chat")


def test_chat_template_file_replaces_the_models(tmp_path):
    t = tmp_path / "template.jinja"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc = run_cli("generate", "--chat", "--chat-template", t, "-p", "def add(a, b):", "-n", "2", "--json")
    e = edgemoe.load()
    assert prompt_tokens(proc) == len(e.tokenizer.encode("def add(a, b):", add_special_tokens=False))
    assert prompt_tokens(proc) < len(e.chat_prompt([{"role": "user", "content": "def add(a, b):"}]))
    e.close()
    j = tmp_path / "chat_template.json"
    j.write_text(json.dumps({"chat_template": "{{ raise_exception('the JSON template was used') }}"}))
    assert_clean_error(run_cli("generate", "--chat", "--chat-template", j, "-p", "x"),
                       f"{j}: chat template failed: the JSON template was used")
    proc = run_cli("chat", "--chat-template", j, "-n", "2", input="hello\n")
    assert "the JSON template was used" in proc.stderr


def test_chat_template_errors(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    assert_clean_error(run_cli("generate", "--chat", "--chat-template", bad, "-p", "x"),
                       f"--chat-template {bad}: line 2:")
    assert_clean_error(run_cli("chat", "--chat-template", tmp_path / "none.jinja", input=""), "none.jinja: no such file")
    (tmp_path / "t.json").write_text('{"template": "x"}')
    assert_clean_error(run_cli("generate", "--chat", "--chat-template", tmp_path / "t.json", "-p", "x"),
                       'a string "chat_template"')
    (tmp_path / "latin1.jinja").write_bytes(b"caf\xe9")
    assert_clean_error(run_cli("generate", "--chat", "--chat-template", tmp_path / "latin1.jinja", "-p", "x"),
                       "not valid UTF-8")
    assert_clean_error(run_cli("generate", "--chat-template", bad, "-p", "x"), "--chat-template is used only with --chat")
