"""`edgemoe` command line. Each subcommand lives in its own module with `main(argv)`;
they are imported only when used so that `edgemoe --help` stays fast."""

from __future__ import annotations

import importlib
import sys

from ..errors import EdgeMoEError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("edgemoe.cli.generate", "generate text from a prompt"),
    "chat": ("edgemoe.cli.chat", "interactive chat with the chat template"),
    "train-tiny": ("edgemoe_lab.train_tiny", "train the bundled tiny MoE from the Python stdlib"),
    "serve": ("edgemoe.cli.serve", "OpenAI-compatible HTTP server"),
    "convert": ("edgemoe.cli.convert", "convert a Hugging Face checkpoint into resident weights + expert store"),
    "info": ("edgemoe.cli.info", "describe a model: parameters, expert formats, minimum memory budget, context"),
    "profile": ("edgemoe.cli.profile", "measure each expert's activation frequency and sensitivity to each bitwidth"),
    "plan": ("edgemoe.cli.plan", "choose each expert's bitwidth for a loss tolerance or a size budget"),
    "prune": ("edgemoe.cli.prune", "remove each layer's least important experts (a smaller model directory)"),
    "merge": ("edgemoe.cli.merge", "merge each layer's similar experts into shared ones (a model directory)"),
    "eval": ("edgemoe.cli.eval", "perplexity on held-out text (Hugging Face or converted model)"),
    "trace": ("edgemoe.cli.trace", "record every token's experts over a text (a routing trace)"),
    "fit-predictor": ("edgemoe.cli.fit_predictor", "fit expert predictors for preloading from routing traces"),
    "activity": ("edgemoe.cli.activity", "plot expert activity from a routing trace"),
    "simulate": ("edgemoe.cli.simulate", "replay a routing trace through the cache: hit rate, bytes/token, tok/s per policy"),
    "bench": ("edgemoe.cli.bench", "compare with llama.cpp and transformers under memory limits (cgroups)"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
    return "usage: edgemoe COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + "\n\nRun 'edgemoe COMMAND -h' for a command's options."


def main(argv: list[str] | None = None) -> int:
    """Run a command. Without `argv` (the `edgemoe` program, `python -m edgemoe`) the
    process ends here once the command is done; with `argv` the exit code is returned."""
    code = run(sys.argv[1:] if argv is None else list(argv))
    if argv is None and "torch" in sys.modules:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process, skipping the interpreter's finalization: with torch loaded, tearing
    its modules down takes 0.4-0.6 s after the work is done (edgemoe_lab/results/startup.md).
    Exit handlers still run and the output streams are flushed."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written
            pass
    os._exit(code)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .._version import __version__

        print(f"edgemoe {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edgemoe: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
