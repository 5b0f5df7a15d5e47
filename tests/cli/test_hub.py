"""Models named by a Hugging Face hub id (issue 17, section 6). The hub is unreachable
here, so each test builds a hub cache directory in huggingface_hub's layout (refs,
snapshots linking to blobs) and runs edgemoe with HF_HUB_CACHE pointing at it, with
HF_HUB_OFFLINE=1, or against a closed local port as the hub endpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe import assets
from edgemoe.hub import ALLOW_PATTERNS, is_hub_id

from .helpers import assert_clean_error, populate_cache

pytest.importorskip("huggingface_hub")

REPO = "edgemoe-test/tiny-moe"


def run_offline(cache: Path, *args, cwd=None, offline: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HTTP_PROXY", "HTTPS_PROXY",
                                                                             "ALL_PROXY"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
        env["NO_PROXY"] = "*"
    return subprocess.run([sys.executable, "-m", "edgemoe", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("hub")
    snapshot = populate_cache(cache, REPO, assets.MODEL_DIR)
    return cache, snapshot


def test_hub_id_form():
    for good in ("Qwen/Qwen1.5-MoE-A2.7B", "allenai/OLMoE-1B-7B-0924", "mistralai/Mixtral-8x7B-v0.1", "a/b"):
        assert is_hub_id(good), good
    for bad in ("out/", "./out", "/abs/path", "a/b/c", "org/", "/name", "org/na--me", "org/..", "~/model", "model"):
        assert not is_hub_id(bad), bad


def test_only_safetensors_and_small_files_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "pytorch_model.bin", "model.pt", "consolidated.00.pth", "original/consolidated.safetensors",
            "tokenizer.model", "README.md", "generation_config.json", "chat_template.jinja"]
    got = set(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS, ignore_patterns=["*/*"]))
    assert got == {"config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "generation_config.json", "chat_template.jinja"}


def test_generate_and_info_from_the_hub_cache(hub_cache):
    cache, snapshot = hub_cache
    proc = run_offline(cache, "generate", REPO, "-p", "def f", "-n", "3", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["model"]) == snapshot and len(out["token_ids"]) == 3
    proc = run_offline(cache, "info", REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["total"] > 0


def test_python_api_takes_hub_ids(hub_cache):
    cache, snapshot = hub_cache
    code = (f"import edgemoe; e = edgemoe.load({REPO!r}); print(e.path); "
            "print(len(e.generate('def f', max_tokens=2, ignore_eos=True).token_ids))")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(snapshot), "2"]


def test_offline_and_not_in_the_cache(hub_cache):
    cache, _ = hub_cache
    proc = run_offline(cache, "generate", "edgemoe-test/absent", "-p", "x")
    assert_clean_error(proc, "edgemoe-test/absent: no such directory, so it was taken as a Hugging Face hub id",
                       "offline mode is on (HF_HUB_OFFLINE=1)", f"not in the hub cache ({cache})")


def test_hub_unreachable(tmp_path):
    proc = run_offline(tmp_path, "generate", "edgemoe-test/absent", "-p", "x", offline=False)
    assert_clean_error(proc, "the hub cannot be reached", "not in the hub cache")


def test_repository_without_safetensors(tmp_path):
    populate_cache(tmp_path, "edgemoe-test/pickles", files={
        "config.json": (assets.MODEL_DIR / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04pickle"})
    proc = run_offline(tmp_path, "generate", "edgemoe-test/pickles", "-p", "x")
    assert_clean_error(proc, "edgemoe-test/pickles", "no safetensors weights", "never loads pickle checkpoints")


def test_a_local_directory_wins_over_a_hub_id(tmp_path):
    local = tmp_path / "edgemoe-test" / "tiny-moe"
    shutil.copytree(assets.MODEL_DIR, local)
    proc = run_offline(tmp_path / "empty-cache", "generate", REPO, "-p", "def f", "-n", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == REPO  # the relative path, not a download


def test_convert_from_a_hub_id(hub_cache, tmp_path):
    cache, _ = hub_cache
    out = tmp_path / "out"
    proc = run_offline(cache, "convert", REPO, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").exists()
    proc = run_offline(cache, "convert", "edgemoe-test/absent", tmp_path / "out2", "-q")
    assert_clean_error(proc, "edgemoe-test/absent", "offline mode is on")
    assert not (tmp_path / "out2").exists()


def test_convert_checks_the_output_before_downloading(tmp_path):
    """An OUT_DIR that cannot be used is refused before the hub is asked for anything: here
    the id is not cached and the hub is offline, so a download attempt would fail first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    proc = run_offline(tmp_path / "empty-cache", "convert", "edgemoe-test/not-cached", out, "-q")
    assert_clean_error(proc, str(out), "already exists (pass --force to replace it)")
    assert "offline" not in proc.stderr and (out / "keep").read_text() == "x"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_offline(tmp_path / "empty-cache", "convert", "edgemoe-test/not-cached", blocker / "sub", "-q")
    assert_clean_error(proc, "cannot create the output's parent directory")
