"""Verdicts come from one function: the README's tables are regenerated and compared, and an estimator registered
with one function appears, with a computed verdict, in the audit, in `klrl table`'s Table 1, in the exact-gradient
test matrix and in the README tables, with no other file touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from klrl.cli.audit import readme_tables
from klrl.core.estimators import ESTIMATORS, register

from conftest import compose_cfg

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- BEGIN klrl audit --markdown -->\n(.*?)<!-- END klrl audit --markdown -->", re.S)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest)


def test_the_readme_tables_are_the_audits():
    found = BLOCK.search(README.read_text())
    assert found, "README.md lacks the generated block; paste the output of `klrl audit --markdown` between the markers"
    assert found.group(1) == readme_tables(), "README's verdict tables are stale: regenerate with `klrl audit --markdown`"


@pytest.fixture
def throwaway():
    @register("half_k1")
    def half_k1(delta):
        """0.5 * delta: half of k1."""
        return 0.5 * delta

    yield "half_k1"
    del ESTIMATORS["half_k1"]


def test_a_registered_estimator_appears_everywhere(throwaway, capsys):
    from klrl.cli.audit import main as audit_main
    from klrl.cli.compose import register_configs
    from klrl.config.validate import validate
    from klrl.runs.table.aggregate import gradient_verdict

    from test_exact_gradients import check_row, matrix

    register_configs()
    # A config choice of `klrl train`, with no YAML.
    cfg = compose_cfg(f"estimator={throwaway}", "placement=reward")
    validate(cfg)
    # The audit computes its verdict: half of k1's unbiased gradient.
    audit_main([f"estimator={throwaway}", "placement=reward", "--policy", "tabular", "--sweep-lengths", "none"])
    out = capsys.readouterr().out
    assert f"{throwaway}-reward" in out and "scaled: 0.5 x grad KL" in out
    audit_main(["--config", f"{throwaway}-loss", "--policy", "tabular", "--sweep-lengths", "none"])
    assert "zero in expectation" in capsys.readouterr().out  # half of k1's zero-mean pathwise term
    # klrl table's Table 1 column, for a run's stored config.
    from omegaconf import OmegaConf

    assert gradient_verdict(OmegaConf.to_container(cfg, resolve=False)) == "scaled: 0.5 x grad KL"
    # The exact-gradient test matrix, and its check, run on it.
    rows = [r for r in matrix() if r.startswith(f"{throwaway}-")]
    assert len(rows) == 11 * 3
    for row in rows[:6]:
        check_row(matrix()[row], row.split("|")[1])
    # The README's generated tables.
    assert f"| {throwaway}" in readme_tables()
