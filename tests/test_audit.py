"""`klrl audit`: its verdicts against theory (docs/theory.md §1.3-1.4), its exact variance against brute force, the
off-policy table, the Monte-Carlo estimator against the exact answer, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

from klrl.audit import exact as ex
from klrl.audit.configs import all_configs, select
from klrl.audit.mc import EnumerableSampler, hotelling, mc_audit
from klrl.audit.policies import tabular_triple, transformer_triple
from klrl.audit.run import audit_regime, length_sweep
from klrl.cli.main import main as cli_main
from klrl.core.losses import PGSpec, policy_loss
from klrl.core.toy import exact_targets, expected_gradient, groups, log_probs

from conftest import run_klrl

UNBIASED = {"rev": 1.0}
# On-policy decompositions into exact targets; None = no combination of <= 3 targets fits.
ON_POLICY = {
    "k1-reward": UNBIASED, "k1-reward+togo": UNBIASED, "k1-reward+seqIS": UNBIASED,
    "k1-loss": {},  # zero in expectation
    "k1-loss+tokIS": {"Rtok": 1.0},
    "k1-both": UNBIASED, "k1-both+togo": UNBIASED, "k1-both+seqIS": UNBIASED,
    "k1-both+tokIS": {"rev": 1.0, "Rtok": 1.0},
    "k2-reward": None,
    "k2-loss": {"Rtok": 1.0},  # the token-level partial gradient
    "k3-reward": {"rev": 1.0, "Fctx": -1.0}, "k3-reward+togo": {"rev": 1.0, "Fctx": -1.0},
    "k3-loss": {"Fctx": 1.0},  # per-context forward KL
    "k3-loss+tokIS": {"Rtok": 1.0},  # DeepSeek-V3.2's rho * k3: the k2 gradient on-policy
    "k3-both": UNBIASED, "k3-both+togo": UNBIASED, "k3-both+seqIS": UNBIASED,
    "k3-both+tokIS": {"rev": 1.0, "Fctx": -1.0, "Rtok": 1.0},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops (see klrl.audit.cli.main)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tab():
    tr = tabular_triple(3, 3, 0.5, 0.5, seed=0)
    configs = all_configs()
    return tr, audit_regime(tr, configs, 2, "rloo", False), audit_regime(tr, configs, 2, "rloo", True)


def test_on_policy_verdicts_match_theory(tab):
    _, on, _ = tab
    for name, parts in ON_POLICY.items():
        assert on["configs"][name]["decomposition"] == parts, name
    rows = on["configs"]
    assert rows["k1-reward"]["verdict"] == "unbiased" and rows["k1-reward"]["vs_rev"]["rel_err"] < 1e-12
    assert rows["k1-loss"]["verdict"] == "zero in expectation"
    # k3-loss follows forward KL context by context, which is not the sequence-level forward-KL gradient.
    assert rows["k3-loss"]["vs_fwd"]["rel_err"] > 0.01 and rows["k3-loss"]["verdict"] == "per-context forward KL"
    theory = {n.split("-")[0] for n in ON_POLICY}  # the paper's estimators; the others are checked by the matrix
    assert {n for n, r in rows.items() if r["unbiased"] and r["estimator"] in theory} == \
        {n for n, p in ON_POLICY.items() if p == UNBIASED}
    assert max(r["mean_check"] for r in rows.values()) < 1e-12  # variance route == toy.expected_gradient


def test_off_policy_only_sequence_weighted_k1_reward_is_unbiased(tab):
    tr, _, off = tab
    rows = off["configs"]
    assert {n for n, r in rows.items() if r["unbiased"] and r["estimator"] in ("k1", "k2", "k3")} == {"k1-reward+seqIS"}
    for name in ("k1-reward", "k1-reward+togo", "k1-loss", "k1-both", "k3-loss", "k3-both"):
        assert rows[name]["vs_rev"]["rel_err"] > 0.05, name  # unweighted forms are biased
    # Token weights give the token-level gradient over pi_old's contexts, not over pi's.
    assert rows["k3-loss+tokIS"]["decomposition"] == {"Rtok@old": 1.0}
    assert rows["k1-loss+tokIS"]["decomposition"] == {"Rtok@old": 1.0}
    assert rows["k3-reward+seqIS"]["decomposition"] == {"rev": 1.0, "Fctx": -1.0}
    t = ex.targets(tr.policy, tr.ref, tr.old)
    assert ex.compare(t["Rtok@old"], t["Rtok"])["rel_err"] > 0.05


def test_context_targets_agree_with_toy():
    tr = tabular_triple(2, 3, 0.7, 0.0, seed=3)
    mine, toy = ex.context_targets(tr.policy, tr.ref, tr.policy), exact_targets(tr.policy, tr.ref)
    assert torch.allclose(mine["Fctx"], toy["context_forward"], atol=1e-14)
    assert torch.allclose(mine["Rtok"], toy["token_reverse"], atol=1e-14)


@pytest.mark.parametrize("baseline", ["rloo", "grpo", "none"])
@pytest.mark.parametrize("name", ["k1-reward", "k3-loss", "k1-both+togo+tokIS", "k3-reward+seqIS"])
def test_exact_variance_matches_per_group_autograd(name, baseline):
    """E||g||^2 - ||E g||^2 from the c/J route == one autograd pass per group, off-policy to exercise every weight."""
    tr = tabular_triple(2, 2, 0.6, 0.4, seed=1)
    spec, G = select([name])[0].spec, 2
    pg = PGSpec(baseline=baseline)
    en = ex.enumerate_groups(tr.policy, tr.ref, G, tr.old)
    mean, var = ex.moments(en, ex.loss_coefficients(en, spec, pg))
    seqs, mask = tr.policy.all_sequences()
    grads, weights = [], []
    for idx in groups(len(seqs), G):
        batch, m = seqs[idx], mask[idx]
        with torch.no_grad():
            old, ref = log_probs(tr.old, batch, m), log_probs(tr.ref, batch, m)
        logp = log_probs(tr.policy, batch, m)
        loss = policy_loss(logp, old, ref, m, torch.zeros(G, dtype=logp.dtype), G, pg, spec).loss
        grads.append(torch.autograd.grad(loss, tr.policy.theta)[0].reshape(-1))
        weights.append(old.sum().exp())
    g, w = torch.stack(grads), torch.stack(weights)
    brute_mean = (w[:, None] * g).sum(0)
    assert torch.allclose(mean, brute_mean, atol=1e-13)
    assert torch.allclose(mean, expected_gradient(tr.policy, tr.ref, spec, pg, G, behaviour=tr.old), atol=1e-13)
    assert var == pytest.approx(float((w * (g**2).sum(-1)).sum() - brute_mean @ brute_mean), rel=1e-10, abs=1e-14)


def test_dr_grpo_shrinks_the_seqsum_reward_by_one_minus_one_over_g():
    tr = tabular_triple(3, 2, 0.5, 0.5)
    rows = audit_regime(tr, select(["k1-reward", "k1-reward+togo"]), 3, "dr_grpo", False)["configs"]
    assert rows["k1-reward"]["decomposition"] == {"rev": pytest.approx(2 / 3, abs=1e-5)}
    assert rows["k1-reward+togo"]["unbiased"]  # the to-go penalty is applied after the baseline


def test_transformer_adapter_gives_the_same_verdicts():
    names = ["k1-reward", "k1-loss", "k2-loss", "k3-reward", "k3-loss", "k3-both", "k3-loss+tokIS"]
    tr = transformer_triple(2, 3, 0.5, 0.5)
    assert tr.policy.theta.numel() > 100  # really the transformer's weights
    rows = audit_regime(tr, select(names), 2, "rloo", False)["configs"]
    for n in names:
        assert rows[n]["decomposition"] == ON_POLICY[n], n
        assert rows[n]["mean_check"] < 1e-10, n


def test_f_tail_matches_known_forms():
    """hotelling's p-value is scipy.stats.f.sf(F, d1, d2): checked against closed forms, even and odd d1."""
    f_sf = stats.f.sf
    for f in (0.1, 1.0, 3.0):
        assert f_sf(f, 2, 10) == pytest.approx((1 + 2 * f / 10) ** -5, rel=1e-12)  # F(2, d2) tail
        assert f_sf(f, 4, 10**7) == pytest.approx(math.exp(-2 * f) * (1 + 2 * f), rel=1e-4)  # -> chi2_4 / 4
        assert f_sf(f, 1, 1) == pytest.approx(1 - 2 / math.pi * math.atan(math.sqrt(f)), rel=1e-12)  # |Cauchy|^2
        x = 3 * f  # F(3, inf) = chi2_3 / 3, whose tail is erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2)
        chi2_3 = math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
        assert f_sf(f, 3, 10**7) == pytest.approx(chi2_3, rel=1e-4)


def test_hotelling_in_odd_dimensions():
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(30, 1, generator=gen, dtype=torch.float64) + 0.3
    t2, p = hotelling(d)  # k = 1: the two-sided one-sample t-test
    ref = stats.ttest_1samp(d[:, 0].numpy(), 0.0)
    assert t2 == pytest.approx(ref.statistic**2, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-10)
    mix = torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 0.1]], dtype=torch.float64)
    ps = [hotelling(torch.randn(40, 3, generator=gen, dtype=torch.float64) @ mix)[1] for _ in range(400)]
    assert 0.02 < sum(p < 0.05 for p in ps) / len(ps) < 0.09  # calibrated at k = 3
    with pytest.raises(ValueError, match="more samples than dimensions"):
        hotelling(torch.randn(3, 3, dtype=torch.float64))


def test_hotelling_calibration():
    """Under H0 about 5% of tests reject at 0.05."""
    gen = torch.Generator().manual_seed(0)
    ps = [hotelling(torch.randn(60, 4, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0.1]], dtype=torch.float64))[1] for _ in range(400)]
    assert 0.02 < sum(p < 0.05 for p in ps) / len(ps) < 0.09


@pytest.mark.parametrize("off_policy, k", [(False, 4), (True, 3)])  # an odd projection too
def test_monte_carlo_agrees_with_exact_on_the_tabular_policy(off_policy, k):
    tr = tabular_triple(3, 2, 0.6, 0.5, seed=2)
    names = ["k1-reward", "k1-loss", "k3-loss", "k3-reward", "k1-reward+seqIS", "k3-loss+tokIS"]
    specs = {c.name: c.spec for c in select(names)}
    pg, G = PGSpec(), 2
    behaviour = tr.old if off_policy else None
    sampler = EnumerableSampler(tr.policy, tr.ref, G, behaviour, seed=5)
    res = mc_audit(sampler, specs, pg, n_batches=400, n_pilot=200, k=k, seed=1)
    basis, z = res["basis"], res["z"]
    assert basis.shape[1] == k and res["k"] == k
    exact = {n: expected_gradient(tr.policy, tr.ref, s, pg, G, behaviour=behaviour).detach() for n, s in specs.items()}
    for n in names:
        _, p = hotelling(z[n], basis.T @ exact[n])
        assert p > 1e-3, (n, p)  # the MC mean is consistent with the exact mean
    u = basis[:, 0]
    for n in names:
        truth = float(u @ exact[n] / (u @ exact["k1-reward"]))
        row = res["configs"][n]
        assert abs(row["scale"] - truth) < 2.5 * row["scale_ci"] + 1e-9, (n, row, truth)
    if not off_policy:  # and the test has power where the bias is large
        assert res["configs"]["k1-loss"]["differs"] and res["configs"]["k3-reward"]["differs"]
        assert res["configs"]["k1-reward+seqIS"]["identical"]


def test_cli_writes_json_and_png(tmp_path):
    out, png = tmp_path / "audit.json", tmp_path / "audit.png"
    proc = run_klrl("audit", "--vocab", "2", "--length", "2", "--sweep-lengths", "1-3", "--sweep-seeds", "1",
                    "--policy", "tabular", "--json", str(out), "--plot", str(png), cwd=tmp_path, check=True)
    assert "On-policy" in proc.stdout and "Off-policy" in proc.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "klrl.audit/2" and data["mode"] == "exact"
    rows = data["policies"]["tabular"]["on_policy"]["configs"]
    assert len(rows) == len(all_configs()) and rows["k1-reward"]["verdict"] == "unbiased"
    assert data["length_sweep"]["lengths"] == [1, 2, 3]
    k1r = data["length_sweep"]["configs"]["k1-reward"]
    assert k1r["rel_err_std"] == [None] * 3 and [len(v) for v in k1r["rel_err_seeds"]] == [1, 1, 1]  # one seed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"  # the vector twin


def test_length_sweep_records_the_spread_over_seeds():
    sweep = length_sweep(2, [1, 2], 2, "rloo", 0.5, [0, 1000, 2000], select(["k1-reward", "k3-loss", "k1-both+seqIS"]))
    for name, row in sweep["configs"].items():
        for key in ("rel_err", "var_group", "bias_norm"):
            for mean, std, seeds in zip(row[key], row[f"{key}_std"], row[f"{key}_seeds"]):
                assert len(seeds) == 3 and mean == pytest.approx(sum(seeds) / 3, rel=1e-12)
                sd = float(torch.tensor(seeds, dtype=torch.float64).std())
                assert std == pytest.approx(sd, rel=1e-9), (name, key)
    assert sweep["configs"]["k1-both+seqIS"]["var_single"] == [None, None]  # needs groups: no single-sample number
    assert sweep["configs"]["k1-both+seqIS"]["var_single_seeds"] == [[None] * 3] * 2


def test_sweep_figure_separates_round_off_from_bias():
    """Unbiased configurations (relative bias ~1e-15, or exactly 0) sit in a round-off strip below the biased ones,
    on a broken log axis, named in its note; the biased ones carry min-max error bars over the seeds."""
    from klrl import plotstyle
    from klrl.audit.report import sweep_figure

    configs = {"k1-reward": {"rel_err": [0.0, 3e-16], "rel_err_seeds": [[0.0, 0.0], [1e-16, 5e-16]]},
               "k3-reward": {"rel_err": [0.2, 0.5], "rel_err_seeds": [[0.1, 0.3], [0.4, 0.6]]},
               "k3-loss": {"rel_err": [0.1, 0.3], "rel_err_seeds": [[0.05, 0.15], [0.2, 0.4]]}}
    for row in configs.values():
        row["var_group"] = [0.1, 1.0]
    fig = sweep_figure({"vocab": 2, "lengths": [1, 2], "seeds": [0, 1], "configs": configs})
    top = next(ax for ax in fig.axes if ax.get_title() == "bias (exact)")
    strip = next(ax for ax in fig.axes if ax.get_facecolor()[0] < 0.95)  # the grey round-off strip
    assert top.get_yscale() == strip.get_yscale() == "log"
    assert strip.get_ylim()[0] < plotstyle.FLOOR and strip.get_ylim()[1] == plotstyle.ROUNDOFF
    assert top.get_ylim()[0] > plotstyle.ROUNDOFF and top.get_ylim()[1] >= 0.6  # the largest seed fits
    bars = {c.get_label(): c for c in strip.containers}
    assert list(bars["k1-reward"].lines[0].get_ydata()) == [plotstyle.FLOOR, 3e-16]  # 0 drawn at the floor
    assert not bars["k1-reward"].has_yerr and bars["k3-reward"].has_yerr
    assert any("unbiased (k1-reward)" in t.get_text() for t in strip.texts)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"colour = estimator", "line style = placement", "k1", "k3", "reward", "loss"} <= set(legend)
    assert "error bar: min-max over 2 seeds" in legend


def test_sweep_figure_one_seed_log_axes_and_a_legend_for_every_style(tmp_path):
    """Both panels on log axes; one seed: no error bars, and the legend says so; every estimator and placement drawn
    has its legend entry; configurations sit side by side around each T (their error bars cannot hide each other);
    PNG and PDF written."""
    import numpy as np

    from klrl import plotstyle
    from klrl.audit.report import sweep_figure, write_plot

    names = ["k1-reward", "k2-loss", "k3-both", "abs-loss"]
    configs = {n: {"rel_err": [0.1 * (i + 1)] * 3, "rel_err_seeds": [[0.1 * (i + 1)]] * 3, "var_group": [0.1, 1, 10],
                   "var_group_seeds": [[0.1], [1], [10]]} for i, n in enumerate(names)}
    configs["k1-reward"].update(rel_err=[0.0] * 3, rel_err_seeds=[[0.0]] * 3)  # unbiased: exactly 0
    sweep = {"vocab": 2, "lengths": [1, 2, 3], "seeds": [0], "group_size": 2, "baseline": "rloo", "configs": configs}
    png = tmp_path / "fig" / "audit.png"
    assert write_plot(png, sweep) == [png, png.with_suffix(".pdf")]
    assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    fig = sweep_figure(sweep)
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    bars = [c for ax in fig.axes for c in ax.containers]
    assert bars and not any(c.has_yerr for c in bars)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"k1", "k2", "k3", "abs", "reward", "loss", "both", "one seed: no error bars"} <= set(legend)
    assert "one random" in fig.get_suptitle()
    var = next(ax for ax in fig.axes if ax.get_title() == "variance (exact)")
    xs = np.array([c.lines[0].get_xdata() for c in var.containers])  # [config, T]
    assert len({tuple(x) for x in xs}) == len(names) and (np.abs(xs - [1, 2, 3]) < 0.5).all()
    strip = next(ax for ax in fig.axes if ax.get_facecolor()[0] < 0.95)
    assert any("unbiased (k1-reward)" in t.get_text() for t in strip.texts)
    assert strip.get_ylim()[1] == plotstyle.ROUNDOFF


@pytest.mark.parametrize("args", [
    ["--vocab", "10", "--length", "10"],
    ["--vocab", "3", "--length", "3", "--group-size", "5"],
    ["--config", "k4-loss"],
    ["--baseline", "ppo"],
    ["--vocab", "two"],
    ["--sweep-lengths", "1-40"],
    ["model=tiny"],
    ["--mc", "model=nosuchmodel"],
    ["--mc", "beta=-1"],
])
def test_bad_input_is_one_line_and_exit_2(capsys, args):
    with pytest.raises(SystemExit) as exc:
        cli_main(["audit", *args])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klrl: "), lines


def test_bad_input_through_the_real_command(tmp_path):
    proc = run_klrl("audit", "--vocab", "4", "--length", "5", "--group-size", "3", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "the limit is 262144" in proc.stderr


@pytest.mark.slow
def test_default_invocation(tmp_path):
    out = tmp_path / "a.json"
    proc = run_klrl("audit", "--json", str(out), "--plot", str(tmp_path / "a.png"), cwd=tmp_path, check=True)
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"tabular", "transformer"}, proc.stdout
    for kind in data["policies"].values():
        assert kind["on_policy"]["configs"]["k3-loss"]["verdict"] == "per-context forward KL"


@pytest.mark.slow
def test_mc_on_the_tiny_model(tmp_path):
    out = tmp_path / "mc.json"
    # A 40-step warm start sits near its random init, so it needs more weight noise for a KL of ~0.2 nats.
    run_klrl("audit", "--mc", "--batches", "60", "--pilot", "30", "--noise", "0.4",
             "--config", "k1-loss,k3-reward,k3-both", "--json", str(out), "model.warmstart.steps=40",
             cwd=tmp_path, check=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["mode"] == "mc" and set(data["configs"]) == {"k1-reward", "k1-loss", "k3-reward", "k3-both"}
    assert data["configs"]["k1-loss"]["differs"] and not data["configs"]["k3-both"]["differs"]
