"""Every command block of README.md runs as written, on the bundled model (issue 17, section 8).

How the README is run (README.md says the same where the placeholders first appear):

- Each ```sh block is a bash script (`set -euo pipefail`) run in one scratch directory
  shared by all blocks, in README order: later blocks use what earlier ones wrote (out/,
  profile.json, ...). Standard input is empty. PATH starts with this interpreter's
  directory, and `.venv` in the scratch directory links to this environment, so that
  `. .venv/bin/activate` and `edgemoe` work as in a checkout.
- Placeholders are not rewritten, they are made real: `path/to/hf-model` is a directory
  in the scratch directory holding a copy of the bundled model, `path/to/model.gguf` is
  that model written as a Q8_0 GGUF the way llama.cpp's converter writes it
  (tests/store/gguf_helpers.py), and the hub id `ORG/NAME` is that model in a hub cache
  built for the test (HF_HUB_CACHE, HF_HUB_OFFLINE=1).
- `<!-- readme-test: skip: REASON -->` on the line before a block skips it. Only what
  cannot run here may be skipped: downloads (the machine is offline), `make test` (it runs
  this suite), benchmarks that need root, peers and GBs of disk.
- `<!-- readme-test: server -->` before a block: its first command is a server, started in
  the background; the test waits for its port, runs the rest of the block, then stops it.
  The port number written in the block is replaced by a free one (the only rewrite: a
  fixed port may be taken on a shared machine).
- ```python blocks run with this interpreter in the same directory.
- A `curl` command must get a JSON answer with "choices" (curl itself exits 0 on HTTP errors).
- The text printed by every `edgemoe generate` and `edgemoe chat` command and by python
  blocks must not loop (a piece of 4-40 characters repeated 4 times in a row): the README
  shows settings that give sensible output on the bundled model.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.helpers import populate_cache
from edgemoe import assets

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
LOOP = re.compile(r"(.{4,40}?)\1{3,}", re.S)
HUB_ID = "ORG/NAME"
TIMEOUT = 600


@dataclass
class Block:
    line: int  # of the opening fence
    lang: str
    code: str
    marker: str | None = None
    commands: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def parse_readme(text: str) -> list[Block]:
    """The ```sh and ```python blocks, each with the readme-test marker on the line (or
    the non-blank line) before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(prev)
        if lang in ("sh", "bash", "python"):
            b = Block(start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", marker.group(1) if marker else None)
            b.commands = split_commands(b.code) if lang != "python" else []
            blocks.append(b)
        i = j + 1
    return blocks


def split_commands(code: str) -> list[str]:
    """Shell commands of a block: lines joined at trailing backslashes, blank and
    comment-only lines left out."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur)
        cur = ""
    return out


BLOCKS = parse_readme(README.read_text())


def loops(text: str) -> list[str]:
    """Pieces of text repeated 4+ times in a row (not whitespace or drawing characters)."""
    return [m.group(0)[:120] for m in LOOP.finditer(text)
            if m.group(1).strip() and not set(m.group(1).strip()) <= set("#-=|_*.+ ")]


def generated_text(command: str, out: str) -> str | None:
    """What an `edgemoe generate` or `edgemoe chat` command generated (the "text" of its
    JSON object with --json); None for other commands."""
    words = command.split()
    if not (len(words) > 1 and words[0] == "edgemoe" and words[1] in ("generate", "chat")):
        return None
    if "--json" in words:
        import json

        return json.loads(out)["text"]
    return out


def write_bundled_gguf(path: Path) -> None:
    """The bundled model as a Q8_0 GGUF (tokenizer and chat template in the metadata)."""
    import torch
    import transformers

    from store.gguf_helpers import write_gguf

    hf = transformers.AutoModelForCausalLM.from_pretrained(assets.MODEL_DIR, dtype=torch.float32).eval()
    write_gguf(hf, Path(assets.MODEL_DIR), path, "Q8_0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """The scratch directory and environment shared by all blocks, in README order."""

    def __init__(self, work: Path):
        self.work = work
        self.done: dict[int, str | None] = {}  # block line -> failure (None: passed)
        bindir = Path(sys.executable).parent
        (work / "path" / "to").mkdir(parents=True)
        shutil.copytree(assets.MODEL_DIR, work / "path" / "to" / "hf-model")
        write_bundled_gguf(work / "path" / "to" / "model.gguf")
        (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        self.hub = work.parent / "hub-cache"
        populate_cache(self.hub, HUB_ID, assets.MODEL_DIR)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VIRTUAL_ENV"))}
        self.env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_CACHE=str(self.hub),
                        HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", HOME=str(work))

    def run(self, block: Block) -> None:
        """Run `block` after every earlier block (each once); fail with what went wrong."""
        for b in BLOCKS:
            if b.line >= block.line:
                break
            if b.line not in self.done:
                self._run_once(b)
        self._run_once(block)
        if self.done[block.line]:
            pytest.fail(self.done[block.line], pytrace=False)

    def _run_once(self, block: Block) -> None:
        if block.line in self.done:
            return
        try:
            if block.marker and block.marker.startswith("skip"):
                self.done[block.line] = None
                return
            self.done[block.line] = self._execute(block)
        except subprocess.TimeoutExpired as e:
            self.done[block.line] = f"{block.id}: timed out after {e.timeout} s"

    def _execute(self, block: Block) -> str | None:
        if block.lang == "python":
            proc = subprocess.run([sys.executable, "-c", block.code], cwd=self.work, env=self.env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
            if proc.returncode:
                return f"{block.id}: python block failed:\n{proc.stderr[-3000:]}"
            bad = loops(proc.stdout)
            return f"{block.id}: the python block's output loops: {bad}" if bad else None
        commands = block.commands
        server = None
        if block.marker == "server":
            port = free_port()
            first, commands = commands[0], commands[1:]
            ports = set(re.findall(r"--port (\d+)", first))
            assert len(ports) == 1, f"{block.id}: the server command needs one --port"
            (written,) = ports
            first = first.replace(written, str(port))
            commands = [c.replace(f":{written}", f":{port}") for c in commands]
            server = subprocess.Popen(["bash", "-c", f"exec {first}"], cwd=self.work, env=self.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True)
            if not wait_for_port(port, server):
                out = server.communicate(timeout=30)[0] if server.poll() is not None else ""
                stop(server)
                return f"{block.id}: the server did not start: {first}\n{out[-3000:]}"
        try:
            return self._script(block, commands)
        finally:
            if server is not None:
                stop(server)

    def _script(self, block: Block, commands: list[str]) -> str | None:
        lines = ["set -euo pipefail"]
        for n, c in enumerate(commands):
            lines += [f"echo '@@readme {n}@@'", f"echo '@@readme {n}@@' >&2", c]
        proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=self.work, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT)
        outs = split_output(proc.stdout, len(commands))
        errs = split_output(proc.stderr, len(commands))
        if proc.returncode:
            n = max((k for k, e in enumerate(errs) if e is not None), default=0)
            return (f"{block.id}: `{commands[n].strip()}` failed (exit {proc.returncode}):\n"
                    f"{(errs[n] or '')[-3000:]}")
        for c, out in zip(commands, outs):
            if c.split()[0] == "curl":  # curl exits 0 on HTTP errors: the answer must be a completion
                import json

                try:
                    answer = json.loads(out or "")
                except ValueError:
                    answer = {"error": out}
                if "error" in answer or not answer.get("choices"):
                    return f"{block.id}: `{c.strip()}` did not get a completion: {(out or '')[:500]}"
            text = generated_text(c, out or "")
            if text is not None and loops(text):
                return f"{block.id}: the output of `{c.strip()}` loops: {loops(text)}"
        return None


def split_output(text: str, n: int) -> list[str | None]:
    """Per-command output from the markers the script printed; None for commands that did not run."""
    parts: list[str | None] = [None] * n
    cur = None
    for line in text.splitlines(keepends=True):
        m = re.fullmatch(r"@@readme (\d+)@@\n?", line)
        if m:
            cur = int(m.group(1))
            parts[cur] = ""
        elif cur is not None:
            parts[cur] += line
    return parts


def wait_for_port(port: int, proc: subprocess.Popen, limit_s: float = 120) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        pytest.skip("the README's commands assume the .venv made by 'make setup' (run the tests from it)")
    return Runner(tmp_path_factory.mktemp("readme") / "work")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, runner: Runner):
    if block.marker and block.marker.startswith("skip"):
        pytest.skip(f"{block.id}: {block.marker}")
    runner.run(block)


def test_markers_are_known_and_skips_give_a_reason():
    assert BLOCKS, "no command blocks found in README.md"
    for b in BLOCKS:
        if b.marker is None:
            continue
        assert b.marker == "server" or re.fullmatch(r"skip: \S.{9,}", b.marker), (b.id, b.marker)
    skipped = [c for b in BLOCKS if b.marker and b.marker.startswith("skip") for c in b.commands]
    total = sum(len(b.commands) for b in BLOCKS if b.lang != "python")
    assert len(skipped) <= total // 3, skipped  # most of the README's commands run


def test_loop_detector():
    assert loops("x = f('b', 'b', 'b', 'b', 'b', 'b')")
    assert loops("self.tk.call(self.tk.call(self.tk.call(self.tk.call(self.tk.call(")
    assert not loops("def fibonacci(n):\n    if n < 2:\n        return n\n" + " " * 16 + "return fibonacci(n - 1)")
    assert not loops("#" * 40 + "\n" + "-" * 40)


def test_parser_and_output_split():
    text = "x\n<!-- readme-test: skip: needs the network -->\n```sh\na \\\n  b  # c\n# only a comment\n\nc\n```\n"
    (b,) = parse_readme(text)
    assert b.marker == "skip: needs the network" and b.commands == ["a    b  # c", "c"] and b.line == 3
    assert split_output("@@readme 0@@\nhello\n@@readme 1@@\nbye\n", 3) == ["hello\n", "bye\n", None]
