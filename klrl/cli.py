"""`klrl` command line: train (Hydra), and the tools around it."""

from __future__ import annotations

import sys

USAGE = """usage: klrl COMMAND [ARGS]

commands:
  train    train one configuration, or a sweep with -m (a Hydra app: `klrl train --help`)
"""


def train(args: list[str]) -> None:
    from klrl.app import CONF_DIR, fail, train_main
    from klrl.config import ConfigError
    from klrl.preflight import preflight

    try:
        preflight(args, CONF_DIR)
    except ConfigError as e:
        fail(str(e))
    sys.argv = ["klrl train", *args]
    train_main()


COMMANDS = {"train": train}


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
