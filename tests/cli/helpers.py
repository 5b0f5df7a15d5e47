import hashlib
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args, input: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -m edgemoe ARGS` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "edgemoe", *map(str, args)], input=input, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, a one-line `edgemoe: error:` message containing the fragments, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("edgemoe: error:")]
    assert len(errors) == 1, proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


def populate_cache(cache: Path, repo_id: str, source: Path | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Lay out `repo_id` in a hub cache as snapshot_download leaves it: blobs named by their
    sha256, a snapshot folder of symlinks for one commit, and refs/main naming that commit.
    Returns the snapshot folder."""
    content = {f.name: f.read_bytes() for f in sorted(source.iterdir()) if f.is_file()} if source else {}
    content.update(files or {})
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for name, data in content.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
