"""`klrl` command line: train (Hydra), and the tools around it."""

from __future__ import annotations

import sys

USAGE = """usage: klrl COMMAND [ARGS]

commands:
  train    train one configuration, or a sweep with -m (a Hydra app: `klrl train --help`)
  audit    exact (or --mc Monte-Carlo) bias and variance of every KL configuration's gradient (`klrl audit --help`)
  eval     evaluate a run's checkpoint again: klrl eval RUN_DIR [--n-samples N] [--split NAME]
  sweep    launch a named grid (sweeps/NAME.yaml) as one job array: klrl sweep NAME [--no-wait] [OVERRIDE ...]
  status   state of every run of a sweep (pending/running/completed/diverged/failed, step, SLURM job): klrl status DIR
  table    results table of a sweep directory, seeds aggregated, and the paper's Table 1 (`klrl table --help`)
"""


def _command(module: str):
    """Each command's module is imported only when run: `klrl status` needs neither torch nor transformers."""

    def run(args: list[str]) -> None:
        import importlib

        importlib.import_module(f"klrl.cli.{module}").main(args)

    return run


COMMANDS = {name: _command(module) for name, module in
            (("train", "train"), ("audit", "audit"), ("sweep", "sweep"), ("status", "status"), ("table", "table"),
             ("eval", "eval"))}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"klrl: unknown command {cmd!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[cmd](rest)
    except BrokenPipeError:
        # `klrl sweep NAME --list | head`: the reader left. As the Python docs advise (signal module, "Note on
        # SIGPIPE"), point stdout at devnull so the interpreter's final flush does not raise again, and exit 1.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
