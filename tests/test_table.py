"""`klrl table`: synthetic sweeps in the real run-directory format, the collapse rule, outputs, CLI, a real sweep."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST, compose_cfg, run_klrl
from omegaconf import OmegaConf

from klrl.audit.verdicts import config_verdict
from klrl.cli.table import _compose
from klrl.runs.table.aggregate import (
    CollapseRule,
    curve_collapse,
    gradient_verdict,
    make_report,
    placement_label,
    run_stability,
    stays_below,
    t975,
)
from klrl.runs.table.load import load_run, load_sweep
from klrl import plotstyle
from klrl.runs.table.render import (CURVES, latex_table, markdown, model_figure, write_csv, write_latex,
                                    write_plots)

STEPS = 40


# --- building run directories -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> str:
    return OmegaConf.to_yaml(compose_cfg(*overrides))  # byte for byte what Hydra writes to .hydra/config.yaml


def train_records(n: int, reward, entropy=lambda t: 0.45, kl=lambda t: 0.02) -> list[dict]:
    return [{"step": t, "kind": "train", "reward": reward(t), "accuracy": reward(t), "response_length": 3.5,
             "grad_norm": 2.0 + 0.01 * t, "lr": 1e-4, "kl/exact": kl(t), "kl/k1": kl(t), "kl/k2": kl(t), "kl/k3": kl(t),
             "entropy": entropy(t), "loss": 0.0} for t in range(1, n + 1)]


def evaluation(id_p: float, ood_p: float = 0.7, id_g: float = 0.6, ood_g: float = 0.9, half: float = 0.05) -> dict:
    out = {}
    for key, v in (("id/pass@1", id_p), ("ood/pass@1", ood_p), ("id/greedy", id_g), ("ood/greedy", ood_g)):
        out[f"eval/{key}"], out[f"eval/{key}_lo"], out[f"eval/{key}_hi"] = v, v - half, v + half
    return out


def write_run(root: Path, overrides: list[str], status: str | None, train=(), evals=None, extra_lines: str = "",
              add_steps: bool = True, **summary) -> Path:
    """A run directory as `klrl train` leaves it. evals: {step: evaluation}; status None = no summary yet."""
    overrides = [*overrides, f"steps={STEPS}"] if add_steps else list(overrides)
    run = root / ",".join(sorted(overrides))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(_composed(tuple(overrides)))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    evals = evals or {}
    if train or evals or extra_lines:
        records = [{"step": s, "kind": "eval", **e} for s, e in evals.items() if s == 0] + list(train)
        records += [{"step": s, "kind": "eval", **e} for s, e in evals.items() if s > 0]
        records.sort(key=lambda r: (r["step"], r["kind"] != "train"))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra_lines)
    if status is not None:
        body = {"status": status, "steps": STEPS, "step": STEPS if status == "completed" else 0, "run_dir": str(run)}
        if 0 in evals:
            body["initial_eval"] = evals[0]
        if status == "completed":
            body["final_eval"] = evals[max(evals)] if evals else {}
        body.update(summary)
        (run / "summary.json").write_text(json.dumps(body))
    return run


def completed(root, overrides, id_p, ood_p=0.7, reward=lambda t: 0.3 + 0.3 * t / STEPS, start=0.35, evals=None, **kw):
    ev = {0: evaluation(start), STEPS: evaluation(id_p, ood_p)}
    ev.update(evals or {})
    return write_run(root, overrides, "completed", train_records(STEPS, reward, **kw), ev)


K1R, K1L, K3R, K3L = (["estimator=k1", "placement=reward"], ["estimator=k1", "placement=loss"],
                      ["estimator=k3", "placement=reward"], ["estimator=k3", "placement=loss"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    # k1 in reward, beta 0.1: three stable seeds, final in-domain pass@1 0.50 / 0.54 / 0.58.
    for seed, (p, o, kl) in enumerate([(0.50, 0.70, 0.01), (0.54, 0.72, 0.02), (0.58, 0.74, 0.03)]):
        completed(root, [*K1R, "beta=0.1", f"seed={seed}"], p, o, kl=lambda t, kl=kl: kl)
    # ... a fourth whose summary.json is damaged.
    bad = write_run(root, [*K1R, "beta=0.1", "seed=3"], "completed", train_records(5, lambda t: 0.3))
    (bad / "summary.json").write_text('{"status": "compl')
    # k1 in reward, beta 0.05: reward dips for 15 steps then recovers: not a collapse.
    completed(root, [*K1R, "beta=0.05", "seed=0"], 0.60, 0.65, reward=lambda t: 0.05 if 10 <= t < 25 else 0.4)
    # reward-to-go form: its own row.
    completed(root, [*K1R, "placement.reward_form=togo", "seed=0"], 0.52, 0.71)
    # k1 in loss: one stable seed, one diverged at step 15.
    completed(root, [*K1L, "seed=0"], 0.45, 0.60)
    write_run(root, [*K1L, "seed=1"], "diverged",
              train_records(14, lambda t: 0.3) + [{"step": 15, "kind": "diverged", "reason": "non-finite loss"}],
              {0: evaluation(0.35)}, step=14, diverged_at=15, reason="non-finite loss", final_eval=evaluation(0.35))
    # k3 in reward: collapses, at step 10 (seed 0) and 20 (seed 1); periodic evaluations every 10 steps.
    for seed, drop, ev in ((0, 10, (0.30, 0.05, 0.0)), (1, 20, (0.35, 0.30, 0.02))):
        completed(root, [*K3R, f"seed={seed}"], 0.0, 0.1, reward=lambda t, d=drop: 0.02 if t >= d else 0.4,
                  evals={10 * (i + 1): evaluation(v) for i, v in enumerate(ev)})
    # k3 in loss: one completed seed (bootstrap CI), one failed before any metric, one still running (half a line).
    ev = {0: evaluation(0.35), STEPS: {**evaluation(0.48, 0.55), "eval/id/pass@1_lo": 0.43, "eval/id/pass@1_hi": 0.55}}
    write_run(root, [*K3L, "seed=0"], "completed", train_records(STEPS, lambda t: 0.35), ev)
    write_run(root, [*K3L, "seed=1"], "failed", error="RuntimeError: CUDA out of memory")
    live = write_run(root, [*K3L, "seed=2"], "running", train_records(7, lambda t: 0.35), {0: evaluation(0.35)},
                     extra_lines='{"step": 8, "kind": "train", "rew', step=7)
    (live / "heartbeat").touch()  # a live process (without a fresh heartbeat a "running" run is stale) ...
    os.utime(live / "heartbeat", (time.time() + 86400,) * 2)  # ... however slowly the tests run
    # k2 in loss: launched, nothing written yet.
    write_run(root, ["estimator=k2", "placement=loss", "seed=0"], None)
    # no KL: solves the task while its entropy collapses at step 20.
    completed(root, ["estimator=none", "seed=0"], 0.40, 0.75, entropy=lambda t: 0.01 if t >= 20 else 0.5)
    # a directory whose config cannot be read.
    junk = root / "junk"
    (junk / ".hydra").mkdir(parents=True)
    (junk / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    return root


@pytest.fixture(scope="module")
def report(sweep):
    runs, warnings = load_sweep([sweep])
    return make_report(runs), warnings


def row(rep, estimator, placement, beta=None):
    rows = rep.rows
    sel = rows[(rows["estimator"] == estimator) & (rows["placement"] == placement)]
    if beta is not None:
        sel = sel[np.isclose(sel["beta"], beta)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# --- the table ----------------------------------------------------------------------------------------------------


def test_rows_and_statuses(report):
    rep, warnings = report
    keys = [tuple(r) for r in rep.rows[["estimator", "placement", "beta"]].itertuples(index=False)]
    assert keys == [("none", "none", 0.0), ("k1", "reward", 0.05), ("k1", "reward", 0.1), ("k1", "reward[togo]", 0.1),
                    ("k1", "loss", 0.1), ("k2", "loss", 0.1), ("k3", "reward", 0.1), ("k3", "loss", 0.1)]
    assert set(rep.rows["model"]) == {"tiny"} and rep.split_keys == []
    k1r = row(rep, "k1", "reward", 0.1)
    assert (k1r["runs"], k1r["completed"], k1r["unreadable"], k1r["seeds"]) == (4, 3, 1, "0,1,2,3")
    k3l = row(rep, "k3", "loss")
    assert (k3l["completed"], k3l["failed"], k3l["running"], k3l["runs"]) == (1, 1, 1, 3)
    assert row(rep, "k2", "loss")["pending"] == 1
    assert row(rep, "k1", "loss")["diverged"] == 1
    assert [r.status for r in rep.unplaced] == ["pending"] and rep.unplaced[0].path.name == "junk"
    assert any("unreadable summary.json" in w for w in warnings)
    assert any("1 unreadable line(s) in metrics.jsonl" in w for w in warnings)
    assert any("unreadable .hydra/config.yaml" in w for w in warnings)


def test_seed_aggregation_and_single_run_ci(report):
    rep, _ = report
    k1r = row(rep, "k1", "reward", 0.1)
    half = 4.303 * 0.04 / math.sqrt(3)  # sd of (0.50, 0.54, 0.58) is 0.04
    assert k1r["id_pass1"] == pytest.approx(0.54) and k1r["id_pass1_n"] == 3 and k1r["id_pass1_ci"] == "seeds"
    assert (k1r["id_pass1_lo"], k1r["id_pass1_hi"]) == pytest.approx((0.54 - half, 0.54 + half), abs=1e-3)
    assert k1r["ood_pass1"] == pytest.approx(0.72)
    assert k1r["kl"] == pytest.approx(0.02) and k1r["entropy"] == pytest.approx(0.45)
    assert k1r["id_pass1_start"] == pytest.approx(0.35)
    k3l = row(rep, "k3", "loss")  # one completed seed: its own bootstrap CI, untouched
    assert (k3l["id_pass1"], k3l["id_pass1_lo"], k3l["id_pass1_hi"]) == pytest.approx((0.48, 0.43, 0.55))
    assert k3l["id_pass1_ci"] == "bootstrap"
    k1l = row(rep, "k1", "loss")  # the diverged seed's pre-divergence evaluation is not averaged in
    assert k1l["id_pass1"] == pytest.approx(0.45) and k1l["id_pass1_n"] == 1
    k2 = row(rep, "k2", "loss")
    assert k2["id_pass1_n"] == 0 and math.isnan(k2["id_pass1"]) and math.isnan(k2["kl"])


def test_collapse_verdicts(report):
    rep, _ = report
    # k3/reward seed 0: the 10-step trailing mean of the reward first stays below half its start at step 15;
    # seed 1 at step 25 (its eval falls below 0.35 - 0.2 at step 30, later).
    assert row(rep, "k3", "reward")["stability"] == "collapsed @15,25 (eval, reward) 2/2"
    assert row(rep, "k1", "loss")["stability"] == "diverged @15 1/2; stable 1/2"
    assert row(rep, "k1", "reward", 0.05)["stability"] == "stable"  # dipped and recovered
    assert row(rep, "k1", "reward", 0.1)["stability"] == "stable 3/3"
    assert row(rep, "none", "none")["stability"] == "entropy collapse @29"
    assert row(rep, "k3", "loss")["stability"] == "stable"  # the running and failed seeds are not judged
    assert row(rep, "k2", "loss")["stability"] == "—"


def test_collapse_rule_thresholds_are_options(sweep):
    runs, _ = load_sweep([sweep])
    lenient = make_report(runs, CollapseRule(reward_frac=0.01, eval_drop=0.5, entropy_frac=0.0))
    assert row(lenient, "k3", "reward")["stability"] == "stable 2/2"
    assert row(lenient, "none", "none")["stability"] == "stable"
    reward_only = make_report(runs, CollapseRule(eval_drop=1.0))
    assert row(reward_only, "k3", "reward")["stability"] == "collapsed @15,25 (reward) 2/2"


def test_stays_below_and_curve_rule():
    steps = np.arange(1, 9)
    assert stays_below(steps, np.array([1, 1, 0, 0, 1, 0, 0, 0.0]), 0.5) == 6
    assert stays_below(steps, np.array([1, 1, 0, 0, 1, 0, 0, 1.0]), 0.5) is None  # recovered
    assert stays_below(steps, np.zeros(8), 0.5) == 1
    assert stays_below(steps, np.array([0, 0, 0, np.nan, 0, 0, 0, 0]), 0.5) == 5
    flat = pd.DataFrame({"step": range(1, 101), "reward": 0.0})
    assert curve_collapse(flat, "reward", 0.5, CollapseRule()) is None  # nothing to lose
    drop = pd.DataFrame({"step": range(1, 101), "reward": [0.5] * 60 + [0.1] * 40})
    # w = 10; the trailing mean first falls below 0.25 once 7 of its 10 steps are low: step 67
    assert curve_collapse(drop, "reward", 0.5, CollapseRule()) == 67
    assert curve_collapse(drop, "reward", 0.5, CollapseRule(window=1)) == 61
    short = pd.DataFrame({"step": [1, 2, 3], "reward": [0.4, 0.1, 0.1]})
    assert curve_collapse(short, "reward", 0.5, CollapseRule()) == 2  # w = 1 for a run this short


def test_t_quantiles():
    # standard-table values, and the exact ones beyond the table: t_{0.975}(31) = 2.03951, (60) = 2.00030
    assert (t975(1), t975(2), t975(30)) == pytest.approx((12.706, 4.303, 2.042), abs=5e-4)
    assert t975(31) == pytest.approx(2.03951, abs=1e-5) and t975(60) == pytest.approx(2.00030, abs=1e-5)
    assert t975(1000) == pytest.approx(1.96234, abs=1e-5) and t975(10**9) == pytest.approx(1.959964, abs=1e-6)
    # the figures' bands use the same quantile
    assert plotstyle.t_halfwidth(0.04, 3) == pytest.approx(t975(2) * 0.04 / math.sqrt(3))
    assert math.isnan(plotstyle.t_halfwidth(0.04, 1))


def test_gradient_verdicts_and_table1(report):
    rep, _ = report
    # Every verdict is the audit's for the group's own config (klrl.audit.verdicts), on- or off-policy as it ran.
    for g, grad in zip(rep.groups, rep.rows["gradient"]):
        v = config_verdict(g.config)
        assert grad == (v.short if g.estimator != "none" else "no KL"), g.label
    assert gradient_verdict({"estimator": {"name": "none"}, "placement": {"name": "none"}}) == "no KL"
    off = OmegaConf.to_container(compose_cfg("async_level=2", "algo.is_truncate=8"), resolve=False)
    assert gradient_verdict(off) == config_verdict(off, off_policy=True).short + " (off-policy)"
    on = OmegaConf.to_container(compose_cfg(), resolve=False)
    assert gradient_verdict(on) != gradient_verdict(off)  # on- and off-policy verdicts of k1-reward differ
    assert placement_label({"name": "both", "reward_form": "togo", "reward_is_weight": True, "loss_is_weight": True}) \
        == "both[togo,reward-is,loss-is]"
    assert placement_label({"name": "loss", "loss_is_weight": False}) == "loss"

    t1 = rep.table1.set_index(["estimator", "placement"])
    assert list(t1.index) == [("none", "none"), ("k1", "reward"), ("k1", "reward[togo]"), ("k1", "loss"),
                              ("k2", "loss"), ("k3", "reward"), ("k3", "loss")]
    by_group = {(g.estimator, g.placement): grad for g, grad in zip(rep.groups, rep.rows["gradient"])}
    for key in t1.index:  # Table 1 carries each configuration's computed verdict
        assert t1.loc[key, "gradient"] == by_group[key]
    assert t1.loc[("k1", "reward"), "stability"] == "stable 4/4"  # both betas; the unreadable run is not judged
    assert t1.loc[("k3", "reward"), "stability"] == "collapsed (eval, reward) 2/2"
    assert t1.loc[("k1", "loss"), "stability"] == "diverged 1/2; stable 1/2"
    # k1/reward is represented by its best beta (0.05: 0.60 in-domain, 0.65 OOD).
    id_rank = t1["id_rank"].to_dict()
    assert id_rank == {("k1", "reward"): 1, ("k1", "reward[togo]"): 2, ("k3", "loss"): 3, ("k1", "loss"): 4,
                       ("none", "none"): 5, ("k3", "reward"): 6, ("k2", "loss"): pytest.approx(float("nan"), nan_ok=True)}
    assert t1.loc[("none", "none"), "ood_rank"] == 1 and t1.loc[("k1", "reward"), "ood_rank"] == 3
    assert t1.loc[("k1", "reward"), "id_rank_detail"] == "0.600 @β=0.05"


def squash(text: str) -> str:
    """A pipe table with tabulate's column padding removed: `| tiny    | k1 |` -> `| tiny | k1 |`."""
    return re.sub(r" {2,}", " ", text)


def test_markdown(report, sweep):
    rep, _ = report
    md = squash(markdown(rep, [sweep]))
    assert "| tiny | k1 | reward | 0.1 | 0.540 ± 0.099 | 0.720 ± 0.050 |" in md
    assert "| tiny | k3 | loss | 0.1 | 0.480 ± 0.060† |" in md
    assert "1 running, 1 completed, 1 failed |" in md
    k3_reward = rep.rows.set_index(["estimator", "placement"]).loc[("k3", "reward"), "gradient"]
    assert f"| k3 | reward | {k3_reward} | collapsed (eval, reward) 2/2 | 6 (0.000 @β=0.1) |" in md
    assert "- failed: `" in md and "RuntimeError: CUDA out of memory" in md
    assert "- diverged: `" in md and "(at step 15: non-finite loss)" in md
    assert "- running: `" in md and "(step 7/40)" in md
    assert "- pending: `" in md and "estimator=k2" in md
    assert "no readable config (not in the table): `" in md
    assert "16 runs: 2 pending, 1 running, 10 completed, 1 diverged, 1 failed, 1 unreadable." in md
    assert "- unreadable: `" in md and "(unreadable summary.json: JSONDecodeError" in md


def test_files_written(report, tmp_path):
    rep, _ = report
    csv, t1csv = write_csv(rep, tmp_path / "out" / "results.csv")
    assert t1csv.name == "results.table1.csv"
    back = pd.read_csv(csv)
    assert len(back) == 8 and {"id_pass1", "id_pass1_lo", "ood_pass1_hi", "stability", "kl", "failed"} <= set(back)
    assert back.loc[back["estimator"].eq("k1") & back["beta"].eq(0.1) & back["placement"].eq("reward"),
                    "id_pass1"].item() == pytest.approx(0.54)
    assert len(pd.read_csv(t1csv)) == 7
    write_latex(rep, tmp_path / "out" / "results.tex")
    tex = (tmp_path / "out" / "results.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and r"\toprule" in tex and r"0.540 $\pm$ 0.099" in tex
    assert "reward[togo]" in tex and "β" not in tex and "±" not in tex and "†" not in tex
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left
    figs = write_plots(rep, tmp_path / "plots")
    assert [p.name for p in figs] == ["curves_tiny.png", "curves_tiny.pdf"]  # a vector twin beside every PNG
    assert figs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figs[0].stat().st_size > 20_000
    assert figs[1].read_bytes()[:5] == b"%PDF-"
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


def test_latex_escapes():
    from klrl.runs.table.render import latex_escape

    assert latex_escape("a_b & 50% {x} #1 $") == r"a\_b \& 50\% \{x\} \#1 \$"
    assert latex_escape("0.5 ± 0.1†, β=0.1") == r"0.5 $\pm$ 0.1$^\dagger$, $\beta$=0.1"
    # through pandas' Styler: headers, cells and the caption escaped alike, booktabs rules
    df = pd.DataFrame({"a_b & 50%": ["{x} #1 $", "0.5 ± 0.1†"], "β": ["k1/reward[togo]", "x|y"]})
    tex = latex_table(df, "rule: window_10 & more", "tab:x")
    assert r"a\_b \& 50\% & $\beta$ \\" in tex and r"\{x\} \#1 \$ & k1/reward[togo] \\" in tex
    assert r"0.5 $\pm$ 0.1$^\dagger$ & x|y \\" in tex and r"\caption{rule: window\_10 \& more}" in tex
    assert [line for line in tex.splitlines() if line.endswith("rule")] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"\begin{tabular}{ll}" in tex and r"\label{tab:x}" in tex and r"\small" in tex


def test_markdown_cells_are_kept_as_text():
    from klrl.runs.table.render import md_table

    md = md_table(pd.DataFrame({"β": ["0.10", "1e-3"], "x|y": ["a|b", "two\nlines"]}))
    lines = [squash(line) for line in md.splitlines()]
    assert lines[0] == r"| β | x\|y |" and lines[2] == r"| 0.10 | a\|b |" and lines[3] == "| 1e-3 | two lines |"


# --- figures ------------------------------------------------------------------------------------------------------


def lines_by_label(fig) -> dict:
    """{label: data line} of a figure's labelled lines and error-bar plots."""
    out = {line.get_label(): line for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}
    out.update({c.get_label(): c.lines[0] for ax in fig.axes for c in ax.containers if hasattr(c, "has_xerr")})
    return out


def synthetic_sweep(names: list[str]) -> dict:
    """A `length_sweep` result of the given configurations, as `klrl audit --plot` receives it."""
    return {"vocab": 2, "lengths": [1, 2], "seeds": [0, 1], "group_size": 2, "baseline": "rloo",
            "configs": {n: {"rel_err": [0.5 + i, 0.6 + i], "rel_err_seeds": [[0.4 + i, 0.6 + i]] * 2,
                            "var_group": [0.1, 0.2]} for i, n in enumerate(names)}}


def test_one_style_for_table_and_audit_figures(report):
    """The same estimator has the same colour and the same placement the same line style in `klrl table --plots`
    and `klrl audit --plot` (klrl.plotstyle, both spellings of a placement)."""
    from matplotlib.colors import to_rgb

    from klrl.audit.report import sweep_figure

    rep, _ = report
    table = lines_by_label(model_figure("tiny", [g for g in rep.groups if g.model == "tiny"], span=3))
    audit = lines_by_label(sweep_figure(synthetic_sweep(["k1-reward", "k1-loss", "k3-reward", "k3-loss"])))
    audit.update(lines_by_label(sweep_figure(synthetic_sweep(["k1-reward+togo"]))))  # variants: drawn when alone
    for table_label, audit_name in (("k1/loss β=0.1", "k1-loss"), ("k3/reward β=0.1", "k3-reward"),
                                    ("k3/loss β=0.1", "k3-loss"), ("k1/reward[togo] β=0.1", "k1-reward+togo")):
        t, a = table[table_label], audit[audit_name]
        assert to_rgb(t.get_color()) == to_rgb(a.get_color()), table_label
        assert (t.get_linestyle(), t.get_marker()) == (a.get_linestyle(), a.get_marker()), table_label
    assert to_rgb(audit["k1-loss"].get_color()) == to_rgb(plotstyle.PALETTE["k1"])
    assert audit["k1-loss"].get_linestyle() == "--" and audit["k1-reward"].get_linestyle() == "-"
    assert audit["k1-reward+togo"].get_marker() == "^" != audit["k1-reward"].get_marker()
    # the two betas of k1/reward: the same hue and line style, told apart by shade
    b05, b10 = table["k1/reward β=0.05"], table["k1/reward β=0.1"]
    assert b05.get_linestyle() == b10.get_linestyle() and to_rgb(b05.get_color()) != to_rgb(b10.get_color())


def test_style_map():
    assert plotstyle.split_placement("both[togo,reward-is,loss-is]") == ("both", ("togo", "seqIS", "tokIS"))
    assert plotstyle.split_config("k1-both+togo+seqIS+tokIS") == ("k1", "both+togo+seqIS+tokIS")
    assert plotstyle.split_placement("both+togo+seqIS+tokIS") == ("both", ("togo", "seqIS", "tokIS"))
    assert plotstyle.split_placement("reward[is]") == ("reward", ("seqIS",))
    assert plotstyle.split_placement("loss[is]") == plotstyle.split_placement("loss+tokIS") == ("loss", ("tokIS",))
    assert plotstyle.style("k3", "loss[is]") == plotstyle.style(*plotstyle.split_config("k3-loss+tokIS"))
    assert [plotstyle.placement_linestyle(p) for p in ("reward", "loss", "both", "none")] == ["-", "--", ":", "-."]
    # an estimator the palette does not know: a fallback colour, the same on every call and in every process (crc32)
    new = plotstyle.estimator_color("k9")
    assert new in plotstyle.FALLBACK and new == plotstyle.estimator_color("k9")
    assert new == plotstyle.FALLBACK[__import__("zlib").crc32(b"k9") % len(plotstyle.FALLBACK)]
    assert len(set(plotstyle.PALETTE.values())) == len(plotstyle.PALETTE)
    assert plotstyle.ema([1.0, float("nan"), 3.0], 1) == pytest.approx([1.0, float("nan"), 3.0], nan_ok=True)
    x = np.random.default_rng(0).normal(size=50)
    assert plotstyle.ema(x, 9) == pytest.approx(pd.Series(x).ewm(span=9).mean().to_numpy())


def test_figure_content(report):
    """Per configuration: its seeds' EMA mean with a t-CI band, evaluation pass@1 curves with CIs, n in the legend."""
    from klrl.runs.table.render import eval_curves, seed_curves

    rep, _ = report
    g = next(g for g in rep.groups if (g.estimator, g.placement, g.beta) == ("k1", "reward", 0.1))
    done = [r for r in g.runs if r.status == "completed"]
    c, ends = seed_curves(done, "kl/exact", span=1)
    assert ends == [] and (c["n"] == 3).all() and c["mean"].to_numpy() == pytest.approx(0.02)
    half = t975(2) * 0.01 / math.sqrt(3)  # kl 0.01 / 0.02 / 0.03
    assert (c["hi"] - c["mean"]).to_numpy() == pytest.approx(half)
    ev = eval_curves(done, "eval/id/pass@1")
    assert list(ev["step"]) == [0, STEPS] and ev["mean"].tolist() == pytest.approx([0.35, 0.54])
    assert ev["hi"].iloc[1] - 0.54 == pytest.approx(t975(2) * 0.04 / math.sqrt(3))
    one = eval_curves(done[:1], "eval/id/pass@1")  # a single seed: its own bootstrap CI
    assert (one["lo"].iloc[1], one["hi"].iloc[1]) == pytest.approx((0.45, 0.55))
    div = next(g for g in rep.groups if (g.estimator, g.placement) == ("k1", "loss"))
    c, ends = seed_curves(div.runs, "reward", span=4)
    assert [x for x, _ in ends] == [14] and c["n"].max() == 2  # the diverged run is drawn to its last step
    fig = model_figure("tiny", [g for g in rep.groups if g.model == "tiny"], span=4)
    titles = [ax.get_title() for ax in fig.axes]
    assert "in-domain pass@1 (evaluation)" in titles and "out-of-domain pass@1 (evaluation)" in titles
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "EMA, span 4 steps" in legend and "k1/reward β=0.1 (n=4)" in legend and "colour = estimator" in legend


def test_figure_single_seed_log_scale_smoothing_and_shades(tmp_path):
    """One seed per configuration: n=1 said, no band across seeds and no "mean over seeds"; a gradient norm that
    spans decades on a log axis (reward linear); the EMA (pandas' ewm, span in the title) over the faint raw trace;
    a second factor (the lag) told apart by shade, the same shade in every colour, explained in the legend."""
    from matplotlib.colors import to_rgb

    spiky = train_records(STEPS, lambda t: 0.3 + 0.3 * (t % 3 == 0))
    for r in spiky:
        r["grad_norm"] = 5000.0 if r["step"] == 20 else 1.0 + 0.01 * r["step"]
    ev = {0: evaluation(0.35), 20: evaluation(0.4), STEPS: evaluation(0.45)}
    for lag in (0, 10):
        write_run(tmp_path, [*K1R, f"async_level={lag}", "algo.is_truncate=8"], "completed", spiky, ev)
        write_run(tmp_path, [*K3L, f"async_level={lag}", "algo.is_truncate=8"], "completed",
                  train_records(STEPS, lambda t: 0.35), ev)
    rep = make_report(load_sweep([tmp_path])[0])
    fig = model_figure("tiny", rep.groups, span=5)
    axes = {ax.get_title().split(" (")[0]: ax for ax in fig.axes}
    assert axes["gradient norm before clipping"].get_yscale() == "log"
    assert axes["training reward"].get_yscale() == axes["entropy"].get_yscale() == "linear"
    title = fig.get_suptitle()
    assert "one seed per configuration (n=1), so no band across seeds" in title and "EMA (span 5 steps)" in title
    assert "mean over seeds" not in title and "min" not in title
    train_axes = [axes[t.split(" (")[0]] for _, t in CURVES]
    assert not any(ax.collections for ax in train_axes)  # no band with one seed
    assert all(ax.collections for ax in fig.axes if "pass@1" in ax.get_title())  # a single seed's bootstrap CI
    reward = axes["training reward"]
    label = "k1/reward β=0.1 async_level=0"
    line = next(ln for ln in reward.get_lines() if ln.get_label() == label)
    raw = np.array([r["reward"] for r in spiky])
    assert line.get_ydata() == pytest.approx(pd.Series(raw).ewm(span=5).mean().to_numpy())
    faint = [ln for ln in reward.get_lines() if ln.get_alpha() is not None and ln.get_alpha() < 0.5]
    assert any(np.allclose(ln.get_ydata(), raw) for ln in faint)  # the raw trace under it
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"colour = estimator", "k1", "k3", "line style = placement", "reward", "loss", "shade of a colour",
            "async_level=0", "async_level=10", "raw run", "EMA, span 5 steps"} <= set(legend)
    assert f"{label} (n=1)" in legend and "95% CI across seeds (t)" not in legend
    lines = {ln.get_label(): ln for ln in reward.get_lines()}
    for est, place in (("k1", "reward"), ("k3", "loss")):
        light, dark = (to_rgb(lines[f"{est}/{place} β=0.1 async_level={a}"].get_color()) for a in (0, 10))
        assert light == to_rgb(plotstyle.PALETTE[est]) and dark == plotstyle.shade(plotstyle.PALETTE[est], 1, 2)


def test_damaged_runs_never_crash(tmp_path):
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    (empty / ".hydra" / "config.yaml").write_text(_composed(("seed=0", f"steps={STEPS}")))
    (empty / "metrics.jsonl").write_text("")
    (empty / "summary.json").write_text(json.dumps({"status": "completed", "steps": 3}))
    garbage = write_run(tmp_path, ["seed=1"], "running")
    (garbage / "metrics.jsonl").write_bytes(b'\x00\xff{"step":\n[1, 2]\n"text"\n')
    odd = write_run(tmp_path, ["seed=2"], "exploded")
    runs, warnings = load_sweep([tmp_path])
    assert {r.status for r in runs} == {"completed", "stale", "unknown"}  # "running" without a heartbeat: stale
    assert run_stability(load_run(empty), CollapseRule()).kind == "unknown"
    rep = make_report(runs)
    assert len(rep.rows) == 1 and rep.rows.iloc[0]["runs"] == 3
    assert "unexpected status 'exploded'" in " ".join(warnings) and str(odd) in " ".join(warnings)
    md = markdown(rep)
    assert "| unknown |" in md or "1 unknown" in md


def test_missing_runs_from_multirun_yaml(tmp_path):
    """A sweep that died after its first job: the jobs multirun.yaml lists but nobody started are `missing`."""
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["seed=0,1,2", "beta=0.05", "progress=false"]},
                   "sweeper": {"params": None}}}))
    write_run(tmp_path, ["seed=0", "beta=0.05", "progress=False"], "failed", add_steps=False, error="ValueError: boom")
    runs, _ = load_sweep([tmp_path], compose=_compose)  # missing runs' configs composed as `klrl table` does
    assert sorted(r.status for r in runs) == ["failed", "missing", "missing"]
    rep = make_report(runs)
    assert len(rep.rows) == 1  # the missing jobs land in the same configuration row
    r = rep.rows.iloc[0]
    assert (r["failed"], r["missing"], r["seeds"]) == (1, 2, "0,1,2")
    assert "- missing: `seed=1 beta=0.05 progress=False`" in markdown(rep)

    # Another sweeper (e.g. a grid read from a file) launches jobs this cannot list: nothing is called missing.
    other = tmp_path / "other"
    other.mkdir()
    (other / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["steps=2"]}, "sweeper": {"_target_": "my.GridSweeper", "params": None}}}))
    assert load_sweep([other]) == ([], [])


def test_cli(sweep, tmp_path):
    out = run_klrl("table", str(sweep), "--csv", str(tmp_path / "t.csv"), "--latex", str(tmp_path / "t.tex"),
                   "--plots", str(tmp_path / "plots"), "--window", "5", "--ema", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("## Sweep results") and "## Table 1" in out.stdout
    assert "window=5" in out.stdout
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t.table1.csv").exists() and (tmp_path / "t.tex").exists()
    assert (tmp_path / "plots" / "curves_tiny.png").exists() and (tmp_path / "plots" / "curves_tiny.pdf").exists()
    assert "warning:" in out.stderr  # the damaged runs are reported, not fatal


@pytest.mark.parametrize("args, code, message", [
    (["nope"], 2, "not a directory"),
    (["empty"], 1, "no run directories"),
    (["sweep", "--reward-frac", "2"], 2, "--reward-frac"),
    (["sweep", "--window", "0"], 2, "--window"),
    (["sweep", "--ema", "0"], 2, "--ema"),
])
def test_cli_errors(sweep, tmp_path, capsys, args, code, message):
    from klrl.cli.main import main

    (tmp_path / "empty").mkdir()
    paths = {"nope": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "sweep": str(sweep)}
    with pytest.raises(SystemExit) as exit_info:
        main(["table", *(paths.get(a, a) for a in args)])
    assert exit_info.value.code == code and message in capsys.readouterr().err


@pytest.mark.slow  # 60-100 s wall on 2 shared CPU cores (about 40 s of CPU): two real trainings and a warm start
def test_real_tiny_sweep(tmp_path):
    """A real two-job Hydra sweep, tabled (with the suite's small, session-cached warm start)."""
    sweep = tmp_path / "sweep"
    mine = ["steps=3", "eval.n_samples=1", "task.eval_size=20", "progress=false"]
    fast = [o for o in FAST if o.split("=")[0] not in {m.split("=")[0] for m in mine}]
    t0 = time.perf_counter()
    run_klrl("train", "-m", "estimator=k1,k3", *mine, *fast, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    out = run_klrl("table", str(sweep), "--csv", str(tmp_path / "t.csv"), "--plots", str(tmp_path / "plots"),
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = pd.read_csv(tmp_path / "t.csv")
    assert list(zip(rows["estimator"], rows["placement"], rows["completed"])) == [("k1", "reward", 1), ("k3", "reward", 1)]
    assert rows["id_pass1"].between(0, 1).all() and rows["ood_pass1"].between(0, 1).all()
    assert (rows["id_pass1_lo"] <= rows["id_pass1"]).all() and (rows["id_pass1"] <= rows["id_pass1_hi"]).all()
    assert rows["kl"].notna().all() and rows["entropy"].gt(0).all()
    expected = [gradient_verdict(OmegaConf.to_container(compose_cfg(*FAST, f"estimator={e}"), resolve=False))
                for e in ("k1", "k3")]
    assert list(rows["gradient"]) == expected and expected[0] != expected[1]
    assert (tmp_path / "plots" / "curves_tiny.png").exists()
    assert "2 runs: 2 completed." in out.stdout
    print(f"real sweep + table: {time.perf_counter() - t0:.1f} s")
