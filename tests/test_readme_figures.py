"""The README's figures for the embedded default come from benchmarks/results/train.json, and a fresh `klrl train`
with the pinned install (constraints.txt) reproduces that file's accuracies exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from klrl.runs.table.aggregate import gradient_verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((ROOT / "benchmarks/results/train.json").read_text())


def readme_row(label: str) -> str:
    """The value cell of the README's benchmark row that starts with `label`."""
    rows = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(f"| {label}")]
    assert len(rows) == 1, f"expected one README row starting with {label!r}, found {len(rows)}"
    return rows[0].split("|")[2]


def start_end(cell: str) -> tuple[float, float]:
    start, end = re.findall(r"\d\.\d+", cell)[:2]
    return float(start), float(end)


@pytest.mark.parametrize("label,key", [("in-domain pass@1", "id_pass@1"), ("out-of-domain pass@1", "ood_pass@1")])
def test_readme_quotes_the_recorded_benchmark(label, key):
    assert start_end(readme_row(label)) == (round(RESULTS[f"{key}_start"], 3), round(RESULTS[f"{key}_end"], 3))


def test_recorded_versions_are_the_pinned_ones():
    pins = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    for pkg in ("transformers", "tokenizers", "numpy"):
        assert RESULTS["versions"][pkg] == pins[pkg], pkg
    assert RESULTS["versions"]["torch"].split("+")[0] == pins["torch"].split("+")[0]


@pytest.mark.slow
def test_a_fresh_default_run_reproduces_the_recorded_accuracies(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "klrl", "train", "progress=false", f"hydra.run.dir={run}"],
                          env={**os.environ, "KLRL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    got = {f"{split}_pass@1_{when}": summary[f"{when2}_eval"][f"eval/{split}/pass@1"]
           for split in ("id", "ood") for when, when2 in (("start", "initial"), ("end", "final"))}
    assert got == {k: RESULTS[k] for k in got}, "the pinned install no longer reproduces benchmarks/results/train.json"
    assert summary["versions"]["transformers"] == version("transformers")


@pytest.mark.parametrize("csv, base", [("tiny/tiny.table1.csv", []),
                                       ("smollm2/smollm2.table1.csv", ["experiment=smollm2_arith"])])
def test_readme_table1_is_the_committed_sweep_table_with_todays_verdicts(csv, base):
    """The README's Table 1 rows (the tiny grid's and SmolLM2's) are docs/figures/<grid>.table1.csv (written by
    `klrl table --csv`), and the gradient column is what the audit says today for each configuration of that grid,
    not a verdict typed once."""
    table = pd.read_csv(ROOT / "docs/figures" / csv, keep_default_na=False)
    lines = (ROOT / "README.md").read_text().splitlines()
    for row in table.itertuples():
        cells = [row.estimator, row.placement, row.gradient, row.stability,
                 f"{row.id_rank:.0f} ({row.id_rank_detail})", f"{row.ood_rank:.0f} ({row.ood_rank_detail})"]
        assert any([c.strip() for c in ln.strip("|").split("|")] == cells for ln in lines), cells
        cfg = OmegaConf.to_container(compose_cfg(*base, f"estimator={row.estimator}",
                                                 *([f"placement={row.placement}"] if row.estimator != "none" else [])))
        assert gradient_verdict(cfg) == row.gradient, (row.estimator, row.placement)
