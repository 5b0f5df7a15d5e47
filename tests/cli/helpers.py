import subprocess
import sys


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
