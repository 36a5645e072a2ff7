"""`klrl table SWEEP_DIR...`: the results table of a sweep and the paper's Table 1 (klrl.runs.table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klrl.config.constraints import Int, NonEmpty, NonNegative, Range, flag, unwritable
from klrl.errors import ConfigError
from klrl.runs.table import render
from klrl.runs.table.aggregate import CollapseRule, make_report
from klrl.runs.table.load import load_sweep


def _compose(job: list[str]):
    """The config a missing run would have had, from the current conf/ (unvalidated: it only names the run)."""
    from klrl.cli.compose import compose

    return compose(job, check=False)


FRACTION = Range(0.0, 1.0, hi_open=True)


def _path(text: str) -> Path:
    return Path(flag(NonEmpty(), str)(text))  # '' would quietly mean the working directory


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own error is two lines (usage + message); klrl's is one
        raise ConfigError(f"table: {message}")


def parser() -> argparse.ArgumentParser:
    d = CollapseRule()
    p = _Parser(
        prog="klrl table",
        description="Results table of a sweep (seeds aggregated) and the paper's qualitative Table 1, as markdown on "
                    "stdout. A sweep is any directory tree of run directories; partial sweeps are fine.")
    p.add_argument("sweep_dirs", nargs="+", type=_path, metavar="SWEEP_DIR")
    p.add_argument("--csv", type=_path, metavar="PATH",
                   help="the table as CSV; Table 1 goes to PATH's stem + .table1.csv")
    p.add_argument("--latex", type=_path, metavar="PATH", help="both tables as LaTeX tabulars (booktabs)")
    p.add_argument("--plots", type=_path, metavar="DIR",
                   help="figures, one per model: training curves and pass@1 evaluations, PNG and PDF")
    p.add_argument("--ema", type=flag(Int(1), int), metavar="STEPS",
                   help="--plots: span of the moving average drawn over the raw curves (default: about 1/10 of the "
                        "run, at most 50; 1 = no smoothing)")
    g = p.add_argument_group("collapse rule (see `klrl.runs.table.aggregate` / docs/table.md)")
    g.add_argument("--window", type=flag(Int(1), int), default=d.window,
                   help=f"trailing-mean steps (default {d.window})")
    g.add_argument("--reward-frac", type=flag(FRACTION), default=d.reward_frac,
                   help="collapsed when the smoothed reward stays below this fraction of its start "
                        f"(default {d.reward_frac})")
    g.add_argument("--eval-drop", type=flag(NonNegative()), default=d.eval_drop,
                   help="collapsed when in-domain pass@1 stays this much below its step-0 value "
                        f"(default {d.eval_drop})")
    g.add_argument("--entropy-frac", type=flag(FRACTION), default=d.entropy_frac,
                   help="entropy collapse below this fraction of the initial entropy; 0 = off "
                        f"(default {d.entropy_frac})")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Inputs that exist, outputs that can be written: checked before any run is read."""
    for d in args.sweep_dirs:
        if not d.is_dir():
            raise ConfigError(f"{d} is not a directory; give sweep directories (trees of run directories)")
    outputs = [("--csv", args.csv, "file"), ("--latex", args.latex, "file"), ("--plots", args.plots, "dir")]
    if args.csv and args.csv.name:  # render.write_csv writes Table 1 beside it
        outputs.append(("--csv", args.csv.with_name(f"{args.csv.stem}.table1{args.csv.suffix or '.csv'}"), "file"))
    for name, path, kind in outputs:
        why = path is not None and unwritable(path, kind)
        if why:
            raise ConfigError(f"{name} {path} cannot be written ({why}); choose another path")


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
        check_args(args)
        runs, warnings = load_sweep(args.sweep_dirs, compose=_compose)
    except ConfigError as e:
        print(f"klrl: {e}", file=sys.stderr)
        sys.exit(2)
    for w in warnings:
        print(f"klrl: warning: {w}", file=sys.stderr)
    if not runs:
        where = ", ".join(map(str, args.sweep_dirs))
        print(f"klrl: no run directories (.hydra/config.yaml) under {where}", file=sys.stderr)
        sys.exit(1)
    rule = CollapseRule(args.window, args.reward_frac, args.eval_drop, args.entropy_frac)
    report = make_report(runs, rule)
    print(render.markdown(report, args.sweep_dirs), end="")
    if args.csv:
        for path in render.write_csv(report, args.csv):
            print(f"klrl: wrote {path}", file=sys.stderr)
    if args.latex:
        render.write_latex(report, args.latex)
        print(f"klrl: wrote {args.latex}", file=sys.stderr)
    if args.plots:
        for path in render.write_plots(report, args.plots, span=args.ema):
            print(f"klrl: wrote {path}", file=sys.stderr)
