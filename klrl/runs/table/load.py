"""Reading a sweep for `klrl table`: find run directories, load what each holds, and name the runs a sweep expected
but never started.

A sweep is any directory tree; a run directory is one that holds `.hydra/config.yaml`. Everything here tolerates
partial and damaged runs, because tables are made while sweeps are still running and after some of their jobs died:
no summary means pending, an unreadable line of metrics.jsonl is skipped (a job killed mid-write leaves half a line),
an unreadable summary or config is reported instead of raised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from klrl.runs.rundir import METRICS, SUMMARY

CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
MULTIRUN = "multirun.yaml"
# What a run can be, in the order tables list them. `missing`: expected by a sweep's multirun.yaml, no directory;
# `pending`: directory and config, no summary yet; `unknown`: summary unreadable or with an unexpected status.
STATUSES = ("completed", "diverged", "failed", "running", "pending", "missing", "unknown")
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


def read_metrics_lenient(path: Path) -> tuple[list[dict], int]:
    """Records of metrics.jsonl and the number of lines that could not be parsed."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _frame(records: list[dict]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = pd.DataFrame(records).drop(columns=["kind"], errors="ignore")
    # A resumed run rewrites the steps after its checkpoint; the last record of a step is the one that counts.
    return df.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True)


def load_run(path: Path) -> Run:
    path = Path(path)
    notes: list[str] = []
    try:
        config = _read_yaml(path / CONFIG)
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except Exception as e:  # noqa: BLE001 - a damaged run must not stop the table
        config = None
        notes.append(f"unreadable {CONFIG}: {type(e).__name__}: {_first_line(e)}")
    overrides = None
    if (path / OVERRIDES).is_file():
        try:
            overrides = [str(o) for o in _read_yaml(path / OVERRIDES) or []]
        except Exception as e:  # noqa: BLE001
            notes.append(f"unreadable {OVERRIDES}: {type(e).__name__}")

    summary: dict = {}
    if not (path / SUMMARY).is_file():
        status = "pending"
    else:
        try:
            summary = json.loads((path / SUMMARY).read_text())
            if not isinstance(summary, dict):
                raise ValueError("not an object")
            status = summary.get("status")
            if status not in STATUSES:
                notes.append(f"{SUMMARY}: unexpected status {status!r}")
                status = "unknown"
        except Exception as e:  # noqa: BLE001
            summary, status = {}, "unknown"
            notes.append(f"unreadable {SUMMARY}: {type(e).__name__}: {_first_line(e)}")

    records, bad = read_metrics_lenient(path / METRICS)
    if bad:
        notes.append(f"{bad} unreadable line(s) in {METRICS}")
    train = _frame([r for r in records if r.get("kind", "train") == "train"])
    evals = _frame([r for r in records if r.get("kind") == "eval"])
    diverged_at = summary.get("diverged_at")
    if diverged_at is None:
        div = [r["step"] for r in records if r.get("kind") == "diverged"]
        diverged_at = div[-1] if div else None
    if status == "diverged" and diverged_at is None:
        diverged_at = summary.get("step")
    return Run(path, config, status, overrides, summary, train, evals,
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


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def expected_jobs(multirun_yaml: Path) -> list[list[str]] | None:
    """The override list of every job a Hydra sweep launched, as that job's `.hydra/overrides.yaml` records it;
    None when the sweep used a sweeper other than Hydra's basic one, whose job list cannot be known from here.

    Expanded with Hydra's own BasicSweeper, as the sweep was, so that the strings compare equal ("false" on the
    command line is "False" in a job's overrides).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
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
    return [job for batch in BasicSweeper.split_arguments(jobs, None) for job in batch]


def compose_configs(jobs: list[list[str]]) -> list[dict | None]:
    """The configs missing jobs would have had, composed from the current conf/; None for a job that no longer
    composes (it is still reported, without a configuration row)."""
    if not jobs:
        return []
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from klrl.cli.train import CONF_DIR

        out: list[dict | None] = []
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for job in jobs:
                try:
                    out.append(OmegaConf.to_container(compose(config_name="train", overrides=job), resolve=False))
                except Exception:  # noqa: BLE001
                    out.append(None)
        return out
    except Exception:  # noqa: BLE001 - e.g. Hydra already initialised by a caller
        return [None] * len(jobs)


def missing_runs(root: Path, runs: list[Run]) -> tuple[list[Run], list[str]]:
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
    missing = [Run(None, cfg, "missing", overrides=job) for job, cfg in zip(todo, compose_configs(todo))]
    return missing, warnings


def load_sweep(roots: list[Path]) -> tuple[list[Run], list[str]]:
    """All runs under the given directories, missing ones included. Returns (runs, warnings)."""
    runs: list[Run] = []
    warnings: list[str] = []
    for root in roots:
        found = [load_run(d) for d in find_run_dirs(Path(root))]
        missing, warn = missing_runs(Path(root), found)
        runs += found + missing
        warnings += warn
    for r in runs:
        warnings += [f"{r.name}: {n}" for n in r.notes]
    return runs, warnings
