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


def train(args: list[str]) -> None:
    from klrl.cli.train import CONF_DIR, fail, train_main
    from klrl.config.schema import ConfigError
    from klrl.cli.compose import preflight

    try:
        preflight(args, CONF_DIR)
    except ConfigError as e:
        fail(str(e))
    sys.argv = ["klrl train", *args]
    train_main()


def audit(args: list[str]) -> None:
    from klrl.cli.audit import main as audit_main

    audit_main(args)


def table(args: list[str]) -> None:
    from klrl.runs.table.aggregate import main as table_main

    table_main(args)


def evaluate(args: list[str]) -> None:
    from klrl.cli.eval import main as eval_main

    eval_main(args)


def sweep(args: list[str]) -> None:
    from klrl.runs.sweep import main as sweep_main

    sweep_main(args)


def status(args: list[str]) -> None:
    from klrl.runs.status import main as status_main

    status_main(args)


COMMANDS = {"train": train, "audit": audit, "sweep": sweep, "status": status, "table": table, "eval": evaluate}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"klrl: unknown command {cmd!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    COMMANDS[cmd](rest)
