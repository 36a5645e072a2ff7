"""`klrl table SWEEP_DIR...`: the results table of a sweep and the paper's Table 1 (klrl.runs.table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klrl.runs.table import render
from klrl.runs.table.aggregate import CollapseRule, make_report
from klrl.runs.table.load import load_sweep


def _compose(job: list[str]):
    """The config a missing run would have had, from the current conf/ (unvalidated: it only names the run)."""
    from klrl.cli.compose import compose

    return compose(job, check=False)


def _fraction(text: str) -> float:
    x = float(text)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return x


def _nonneg(text: str) -> float:
    x = float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return x


def _positive_int(text: str) -> int:
    x = int(text)
    if x < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return x


def parser() -> argparse.ArgumentParser:
    d = CollapseRule()
    p = argparse.ArgumentParser(
        prog="klrl table",
        description="Results table of a sweep (seeds aggregated) and the paper's qualitative Table 1, as markdown on "
                    "stdout. A sweep is any directory tree of run directories; partial sweeps are fine.")
    p.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR")
    p.add_argument("--csv", type=Path, metavar="PATH",
                   help="the table as CSV; Table 1 goes to PATH's stem + .table1.csv")
    p.add_argument("--latex", type=Path, metavar="PATH", help="both tables as LaTeX tabulars (booktabs)")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="figures, one per model: training curves and pass@1 evaluations, PNG and PDF")
    p.add_argument("--ema", type=_positive_int, metavar="STEPS",
                   help="--plots: span of the moving average drawn over the raw curves (default: about 1/20 of the "
                        "run, at most 50; 1 = no smoothing)")
    g = p.add_argument_group("collapse rule (see `klrl.runs.table.aggregate` / docs/table.md)")
    g.add_argument("--window", type=_positive_int, default=d.window, help=f"trailing-mean steps (default {d.window})")
    g.add_argument("--reward-frac", type=_fraction, default=d.reward_frac,
                   help="collapsed when the smoothed reward stays below this fraction of its start "
                        f"(default {d.reward_frac})")
    g.add_argument("--eval-drop", type=_nonneg, default=d.eval_drop,
                   help="collapsed when in-domain pass@1 stays this much below its step-0 value "
                        f"(default {d.eval_drop})")
    g.add_argument("--entropy-frac", type=_fraction, default=d.entropy_frac,
                   help="entropy collapse below this fraction of the initial entropy; 0 = off "
                        f"(default {d.entropy_frac})")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    for d in args.sweep_dirs:
        if not d.is_dir():
            print(f"klrl table: {d} is not a directory", file=sys.stderr)
            sys.exit(2)
    runs, warnings = load_sweep(args.sweep_dirs, compose=_compose)
    for w in warnings:
        print(f"klrl table: warning: {w}", file=sys.stderr)
    if not runs:
        where = ", ".join(map(str, args.sweep_dirs))
        print(f"klrl table: no run directories (.hydra/config.yaml) under {where}", file=sys.stderr)
        sys.exit(1)
    rule = CollapseRule(args.window, args.reward_frac, args.eval_drop, args.entropy_frac)
    report = make_report(runs, rule)
    print(render.markdown(report, args.sweep_dirs), end="")
    if args.csv:
        for path in render.write_csv(report, args.csv):
            print(f"klrl table: wrote {path}", file=sys.stderr)
    if args.latex:
        render.write_latex(report, args.latex)
        print(f"klrl table: wrote {args.latex}", file=sys.stderr)
    if args.plots:
        for path in render.write_plots(report, args.plots, span=args.ema):
            print(f"klrl table: wrote {path}", file=sys.stderr)
