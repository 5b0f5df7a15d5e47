"""The README's demo: the bundled model generates text offline, with no model argument."""

import json
import os
import subprocess
import sys
import time

from edgemoe import assets

NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access attempted during the offline demo")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
"""


def test_demo_runs_offline_with_the_bundled_model(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "generate", "--prompt", "def fibonacci(n):",
                           "--max-tokens", "24", "--temperature", "0", "--repetition-penalty", "1.15", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == str(assets.MODEL_DIR)
    assert out["stats"]["generated_tokens"] >= 1 and out["text"].strip()
    assert elapsed < 60, f"demo took {elapsed:.1f}s"


def test_chat_with_the_bundled_model():
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "chat", "--max-tokens", "16", "--temperature", "0"],
                          input="Write a function that adds two numbers.\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
