"""The GPU benchmark kit (benchmarks/gpu/) end to end in its CPU smoke mode: the real run.sh with SMOKE=1 (device
cpu, the tiny "smoke" shape, a few tokens), on this interpreter's packages (SKIP_WHEELS=1) instead of the carried
wheels. klrl's side always runs; TRL is an optional dependency (the bench extra): when it is not importable, its row
must say skipped and klrl's must still be measured."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu"
FIGURES = ("step_s", "generate_s", "train_s", "completion_tokens", "generate_tokens_per_s", "train_tokens_per_s")
HAVE_TRL = importlib.util.find_spec("trl") is not None


def run_smoke(tmp_path: Path, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "SKIP_WHEELS": "1", "PYTHON": sys.executable, "OUT": str(out),
           "WORK": str(tmp_path / "work"), "BUDGET_S": "300", **(env_extra or {})}
    p = subprocess.run(["bash", str(KIT / "run.sh")], env=env, capture_output=True, text=True, timeout=420)
    assert (out / "summary.json").exists(), p.stdout[-4000:] + p.stderr[-4000:]
    return p, json.loads((out / "summary.json").read_text())


def assert_measured(row: dict) -> None:
    assert row["status"] == "ok", row
    assert row["measured_steps"] >= 1, row
    for k in FIGURES:
        assert isinstance(row[k], (int, float)) and row[k] > 0, (k, row)


@pytest.mark.parametrize("hide_trl", [False, True], ids=["as-installed", "trl-hidden"])
def test_smoke_run(tmp_path, hide_trl):
    env = {}
    if hide_trl:
        if not HAVE_TRL:
            pytest.skip("trl is not installed here: the as-installed run already checks the skipped TRL row")
        fake = tmp_path / "hide" / "trl"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('trl hidden by tests/test_gpu_kit.py')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    trl_expected = HAVE_TRL and not hide_trl
    p, summary = run_smoke(tmp_path, env)
    log = p.stdout[-6000:] + p.stderr[-3000:]
    assert p.returncode == 0, log

    rows = {r["step"]: r for r in summary["rows"]}
    assert set(rows) == {"klrl_smoke", "trl_smoke"}, log
    assert {(r["framework"], r["shape"], r["precision"]) for r in rows.values()} == {
        ("klrl", "smoke", "mixed"), ("trl", "smoke", "mixed")}
    assert_measured(rows["klrl_smoke"])
    if trl_expected:
        assert_measured(rows["trl_smoke"])
        (ratio,) = summary["ratios"]
        assert ratio["status"] == "ok" and all(ratio[k] > 0 for k in ("step_s", "generate_s", "train_s")), ratio
        assert ratio["completion_tokens"] == 1.0, ratio  # the same work on both sides
    else:
        assert rows["trl_smoke"]["status"] == "skipped", rows["trl_smoke"]
        assert "trl not importable" in rows["trl_smoke"]["reason"]
        assert summary["ratios"][0]["status"].startswith("n/a")

    out = tmp_path / "out"
    for name in rows:  # every step leaves its JSON and its log
        assert json.loads((out / f"{name}.json").read_text())["status"] in ("ok", "skipped")
    assert (out / "versions.json").exists() and (out / "run.log").exists()
    md = (out / "summary.md").read_text()
    assert "| klrl_smoke | klrl | smoke | mixed | ok |" in md
    assert json.loads((out / "klrl_smoke.json").read_text())["klrl"]["estimator"] == "k3"


def test_klrl_imports_only_in_the_adapter():
    """klrl's trainer is being refactored: every klrl import of the kit stays in klrl_adapter.py."""
    importers = set()
    for f in KIT.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "klrl" or n.startswith("klrl.") for n in names):
                importers.add(f.name)
    assert importers == {"klrl_adapter.py"}
