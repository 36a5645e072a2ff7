"""`klrl status SWEEP_DIR|NAME`: the state of every run of a sweep (klrl.runs.status)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from klrl.runs.status import collect, render

USAGE = """usage: klrl status SWEEP_DIR|NAME [--json]

The state of every run of a sweep: pending, running, completed, diverged, failed (with the reason), the step reached,
and the SLURM job of each. NAME means outputs/sweeps/NAME.
"""


def resolve_sweep_dir(arg: str) -> Path:
    if not arg.strip():  # Path('') would quietly mean the working directory
        raise FileNotFoundError(f"{arg!r} is not a sweep directory; give a directory or a sweep name")
    path = Path(arg)
    if path.is_dir():
        return path.resolve()
    from klrl.runs.sweep import SWEEP_ROOT


    named = Path.cwd() / SWEEP_ROOT / arg
    if "/" not in arg and named.is_dir():
        return named
    what = "is not a directory" if path.exists() else "does not exist"
    raise FileNotFoundError(f"{arg} {what}" + ("" if "/" in arg else f" (nor is {SWEEP_ROOT / arg} a sweep)"))


def main(args: list[str]) -> None:
    from klrl.cli.train import fail

    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    unknown = [a for a in flags if a != "--json"]
    if unknown:
        fail(f"status: unknown option {unknown[0]!r}; choose from: --json, --help")
    if len(rest) != 1:
        fail(f"status: give one sweep directory or name, not {len(rest)} (usage: klrl status SWEEP_DIR|NAME [--json])")
    try:
        sweep_dir = resolve_sweep_dir(rest[0])
    except FileNotFoundError as e:
        fail(str(e))
    states = collect(sweep_dir)
    if "--json" in flags:
        print(json.dumps({"sweep_dir": str(sweep_dir), "runs": [asdict(s) for s in states]}, indent=2))
    else:
        print(render(states, sweep_dir))
