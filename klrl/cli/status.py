"""`klrl status SWEEP_DIR|NAME`: the state of every run of a sweep (klrl.runs.status)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from klrl.runs.status import collect, render

USAGE = """usage: klrl status SWEEP_DIR|NAME [--json]

The state of every run of a sweep: pending, running, completed, diverged, failed (with the reason), the step reached,
and the SLURM job of each. NAME means outputs/sweeps/NAME.
"""


def resolve_sweep_dir(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        return path.resolve()
    from klrl.runs.sweep import SWEEP_ROOT


    named = Path.cwd() / SWEEP_ROOT / arg
    if "/" not in arg and named.is_dir():
        return named
    raise FileNotFoundError(f"{arg} is not a sweep directory" + ("" if "/" in arg else f" (nor {SWEEP_ROOT / arg})"))


def main(args: list[str]) -> None:
    from klrl.cli.train import fail

    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if not rest or rest[0] in ("-h", "--help") or len(rest) > 1:
        bad = not rest or len(rest) > 1
        print(USAGE, end="", file=sys.stderr if bad else sys.stdout)
        if bad:
            sys.exit(2)
        return
    try:
        sweep_dir = resolve_sweep_dir(rest[0])
    except FileNotFoundError as e:
        fail(str(e))
    states = collect(sweep_dir)
    if as_json:
        print(json.dumps({"sweep_dir": str(sweep_dir), "runs": [asdict(s) for s in states]}, indent=2))
    else:
        print(render(states, sweep_dir))
