"""Reading a sweep for `klrl table`: find run directories, load what each holds, and name the runs a sweep expected
but never started.

A sweep is any directory tree; a run directory is one that holds `.hydra/config.yaml`. Everything here tolerates
partial and damaged runs, because tables are made while sweeps are still running and after some of their jobs died:
no summary means pending, an unreadable line of metrics.jsonl is skipped (a job killed mid-write leaves half a line),
an unreadable summary or config is reported instead of raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from klrl.runs.rundir import CONFIG, METRICS, RunDir
from klrl.runs.rundir import STATUSES as RUN_STATUSES

MULTIRUN = "multirun.yaml"
# What a run can be: a run directory's states (klrl.runs.rundir.STATUSES), and `missing`: expected by a sweep's
# multirun.yaml, no directory.
STATUSES = (*RUN_STATUSES, "missing")
FINISHED = ("completed", "diverged")


@dataclass
class Run:
    path: Path | None  # None for a missing run
    config: dict | None  # the run's config as Hydra saved it (interpolations left unresolved)
    status: str
    overrides: list[str] | None = None
    summary: dict = field(default_factory=dict)
    train: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per training step, sorted by step
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per evaluation, sorted by step
    diverged_at: int | None = None
    notes: list[str] = field(default_factory=list)  # what was wrong with the files, for the report

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else " ".join(self.overrides or [])

    @property
    def final_eval(self) -> dict:
        return self.summary.get("final_eval") or {}

    @property
    def initial_eval(self) -> dict:
        ev = self.summary.get("initial_eval")
        if ev:
            return ev
        at0 = self.evals[self.evals["step"] == 0]
        return at0.iloc[0].dropna().to_dict() if len(at0) else {}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _read_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _frame(records: list[dict]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = pd.DataFrame(records).drop(columns=["kind"], errors="ignore")
    # A resumed run rewrites the steps after its checkpoint; the last record of a step is the one that counts.
    return df.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True)


def load_run(path: Path) -> Run:
    """Everything `klrl table` needs of one run directory; damage is noted, never raised."""
    run = RunDir(path)
    notes: list[str] = []
    try:
        config = run.read_config()
    except ValueError as e:
        config = None
        notes.append(str(e))
    overrides = run.read_overrides()
    state = run.state()
    if state.status in ("unreadable", "unknown"):
        notes.append(state.detail)
    try:
        summary = run.read_summary() or {}
    except ValueError:
        summary = {}
    records, bad = run.read_metrics()
    if bad:
        notes.append(f"{bad} unreadable line(s) in {METRICS}")
    train = _frame([r for r in records if r.get("kind", "train") == "train"])
    evals = _frame([r for r in records if r.get("kind") == "eval"])
    diverged_at = summary.get("diverged_at")
    if diverged_at is None:
        div = [r["step"] for r in records if r.get("kind") == "diverged"]
        diverged_at = div[-1] if div else None
    if state.status == "diverged" and diverged_at is None:
        diverged_at = summary.get("step")
    return Run(run.path, config, state.status, overrides, summary, train, evals,
               int(diverged_at) if diverged_at is not None else None, notes)


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under root (root included) that holds `.hydra/config.yaml`, sorted."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if (d / CONFIG).is_file():
            found.append(d)
        # Run directories hold nothing else to find (tb/, .hydra/), and hidden trees are never sweeps.
        dirnames[:] = [] if (d / CONFIG).is_file() else sorted(n for n in dirnames if not n.startswith("."))
    return sorted(found)




def expected_jobs(multirun_yaml: Path) -> list[list[str]] | None:
    """The override list of every job a Hydra sweep launched, as that job's `.hydra/overrides.yaml` records it;
    None when the sweep used a sweeper other than Hydra's basic one, whose job list cannot be known from here.

    Expanded with Hydra's own BasicSweeper, as the sweep was, so that the strings compare equal ("false" on the
    command line is "False" in a job's overrides).
    """
    from klrl.hydra_private import BASIC_SWEEPER, split_arguments
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = (_read_yaml(multirun_yaml) or {}).get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    if sweeper.get("_target_", BASIC_SWEEPER) != BASIC_SWEEPER:
        return None
    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    params = sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + task
    parsed = OverridesParser.create().parse_overrides(args)
    jobs = [o for o in parsed if not o.is_hydra_override()]
    return [job for batch in split_arguments(jobs) for job in batch]


def compose_configs(jobs: list[list[str]], compose) -> list[dict | None]:
    """The configs missing jobs would have had, by `compose(overrides) -> DictConfig` (none: no configs); None for
    a job that no longer composes (it is still reported, without a configuration row)."""
    from omegaconf import OmegaConf

    out: list[dict | None] = []
    for job in jobs:
        try:
            out.append(OmegaConf.to_container(compose(job), resolve=False) if compose else None)
        except Exception:  # noqa: BLE001 - a grid point that today's conf/ no longer composes
            out.append(None)
    return out


def missing_runs(root: Path, runs: list[Run], compose=None) -> tuple[list[Run], list[str]]:
    """Runs that a multirun.yaml under root expected but that have no directory. Returns (runs, warnings).

    Only for sweeps made by Hydra's basic sweeper; with any other sweeper no run is reported missing.
    """
    have = {frozenset(r.overrides) for r in runs if r.overrides is not None}
    warnings: list[str] = []
    seen: set[frozenset] = set()
    todo: list[list[str]] = []
    for mr in sorted(Path(root).rglob(MULTIRUN)):
        try:
            jobs = expected_jobs(mr)
        except Exception as e:  # noqa: BLE001
            warnings.append(f"{mr}: cannot list the sweep's jobs ({type(e).__name__}: {_first_line(e)}); "
                            "missing runs not shown")
            continue
        for job in jobs or []:
            key = frozenset(job)
            if key in have or key in seen:
                continue
            seen.add(key)
            todo.append(job)
    missing = [Run(None, cfg, "missing", overrides=job) for job, cfg in zip(todo, compose_configs(todo, compose))]
    return missing, warnings


def load_sweep(roots: list[Path], compose=None) -> tuple[list[Run], list[str]]:
    """All runs under the given directories, missing ones included (their configs by `compose`, when given).
    Returns (runs, warnings)."""
    runs: list[Run] = []
    warnings: list[str] = []
    for root in roots:
        found = [load_run(d) for d in find_run_dirs(Path(root))]
        missing, warn = missing_runs(Path(root), found, compose)
        runs += found + missing
        warnings += warn
    for r in runs:
        warnings += [f"{r.name}: {n}" for n in r.notes]
    return runs, warnings
