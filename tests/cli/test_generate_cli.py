import json
import shutil
import sys
from pathlib import Path

from .helpers import assert_clean_error, run_cli


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout and "chat" in proc.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "edgemoe"
    assert exe.exists() or shutil.which("edgemoe")


def test_unknown_command():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_generate_json(tiny_mixtral):
    proc = run_cli("generate", tiny_mixtral, "--prompt", "def add(a, b):", "--max-tokens", "6", "--ignore-eos",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str)
    for key in ("prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "peak_rss_bytes"):
        assert key in out["stats"]
    assert out["stats"]["generated_tokens"] == 6


def test_generate_json_matches_api(tiny_mixtral):
    import edgemoe

    proc = run_cli("generate", tiny_mixtral, "--prompt", "class A:", "-n", "8", "--ignore-eos", "--json",
                   "--temperature", "0")
    api = edgemoe.load(tiny_mixtral).generate("class A:", max_tokens=8, ignore_eos=True)
    assert json.loads(proc.stdout)["token_ids"] == api.token_ids


def test_generate_streams_text_and_prints_stats(tiny_mixtral):
    proc = run_cli("generate", tiny_mixtral, "--prompt", "import os", "--max-tokens", "5", "--ignore-eos",
                   "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr and "peak RSS" in proc.stderr and "prompt:" in proc.stderr


def test_prompt_from_stdin(tiny_mixtral):
    proc = run_cli("generate", tiny_mixtral, "--prompt", "-", "-n", "3", "--json", "--ignore-eos", input="import sys")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["prompt_tokens"] > 1


def test_bad_sampling_flag(tiny_mixtral):
    assert_clean_error(run_cli("generate", tiny_mixtral, "--prompt", "x", "--top-p", "2", "--temperature", "1"),
                       "top_p")
    assert_clean_error(run_cli("generate", tiny_mixtral, "--prompt", "x", "--max-tokens", "0"), "max-tokens")


def test_memory_on_hf_dir_is_refused(tiny_mixtral):
    assert_clean_error(run_cli("generate", tiny_mixtral, "--prompt", "x", "--memory", "1GB"), "convert")


def test_missing_model_dir(tmp_path):
    assert_clean_error(run_cli("generate", tmp_path / "nope", "--prompt", "x"), str(tmp_path / "nope"))


def test_chat_reads_turns_from_stdin(tiny_mixtral):
    proc = run_cli("chat", tiny_mixtral, "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--stats",
                   input="hello\n/reset\nhi again\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("peak RSS") == 2
    assert "conversation cleared" in proc.stderr
