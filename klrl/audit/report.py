"""Printing, JSON and the plot: presentation only, no computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "klrl.audit/2"
LEGEND = """rev = grad KL(pi||pi_ref) (the objective's gradient); fwd = grad KL(pi_ref||pi) (sequence level);
Fctx = sum_s P(s) grad KL(pi_ref(.|s)||pi(.|s)) (per-context forward KL);
Rtok = sum_s P(s) grad KL(pi(.|s)||pi_ref(.|s)) (token-level partial reverse KL); @old: over pi_old's contexts.
pi and pi_ref are the distributions sampled from (temperature, top-p; see klrl/core/distributions.py).
Gradients are per unit beta, task reward 0. cos n/a: the mean gradient is zero up to round-off.
var = tr Cov of the gradient estimator: '1' one sample without baseline, 'G' one group with the baseline."""


def headline(names) -> list[str]:
    """The lines worth plotting: every estimator's plain placements (no +togo/+seqIS/+tokIS variants)."""
    return [n for n in names if "+" not in n.split("-", 1)[1]]


def _cos(x, width: int = 6) -> str:
    return "n/a".rjust(width) if x is None else f"{x:{width}.3f}"


def _num(x, width: int, digits: int = 3) -> str:
    if x is None:
        return "n/a".rjust(width)
    if x != 0 and (abs(x) >= 10 ** (width - digits - 2) or abs(x) < 10 ** -digits):
        return f"{x:.{max(digits - 2, 1)}e}".rjust(width)
    return f"{x:.{digits}f}".rjust(width)


def regime_table(title: str, result: dict, regime: str, G: int) -> str:
    params = list(result["policies"])
    main, others = params[0], params[1:]
    reg = result["policies"][main][regime]
    width = max([len(r["verdict"]) for r in reg["configs"].values()] + [30])
    nw = max([len(n) for n in reg["configs"]] + [22])  # a preset's name (`klrl audit preset=...`) is longer
    head = (f"{'config':<{nw}} {'verdict (' + main + ')':<{width}} {'|bias|':>7} {'cos':>6} {'cos':>6} "
            f"{'var':>8} {'var':>8}")
    sub = f"{'':<{nw}} {'':<{width}} {'/|rev|':>7} {'rev':>6} {'fwd':>6} {'1':>8} {'G=' + str(G):>8}"
    for o in others:
        head += f" | {o + ': |bias|/|rev|':<24}"
        sub += f" | {'':<24}"
    kls = []
    for p in params:
        r = result["policies"][p][regime]
        kls.append(f"{p} ({result['policies'][p]['n_params']} params): KL(pi||pi_ref) = {r['kl_pi_ref']:.4f}"
                   + (f", KL(pi_old||pi) = {r['kl_old_pi']:.4f}" if regime == "off_policy" else ""))
    lines = [title, *("  " + k for k in kls), head, sub]
    for name, row in reg["configs"].items():
        line = (f"{name:<{nw}} {row['verdict']:<{width}} {_num(row['vs_rev']['rel_err'], 7)} "
                f"{_cos(row['vs_rev']['cos'])} {_cos(row['vs_fwd']['cos'])} {_num(row['var_single'], 8)} "
                f"{_num(row['var_group'], 8)}")
        for o in others:
            orow = result["policies"][o][regime]["configs"][name]
            same = "same verdict" if orow["label"] == row["label"] else orow["verdict"]
            line += f" | {_num(orow['vs_rev']['rel_err'], 7)} {same}"
        lines.append(line)
    return "\n".join(lines)


def sweep_table(sweep: dict) -> str:
    Ts = sweep["lengths"]
    names = headline(sweep["configs"]) or list(sweep["configs"])[:8]
    cols = "".join(f"{'T=' + str(t):>10}" for t in Ts)
    out = [f"Against length T (tabular, V={sweep['vocab']}, on-policy); KL(pi||pi_ref) = "
           + ", ".join(f"{k:.3f}" for k in sweep["kl_pi_ref"])]
    for key, label in (("rel_err", "relative bias |E g - rev| / |rev|"), ("var_group", "variance tr Cov, one group")):
        out.append(f"  {label}\n  {'config':<18}{cols}")
        for n in names:
            out.append(f"  {n:<18}" + "".join(_num(v, 10) for v in sweep["configs"][n][key]))
    return "\n".join(out)


def mc_table(res: dict) -> str:
    lines = [
        f"Monte-Carlo audit: {res['n_batches']} batches (paired) + {res['n_pilot']} pilot batches of "
        f"{res['reference']}; Hotelling T^2 on a {res['k']}-dim projection, Bonferroni alpha = "
        f"{res['alpha']}/{res['bonferroni_m']}",
        f"  |E g_ref| (pilot) = {res['pilot_norm']:.4g}; "
        f"E g_ref . u = {res['ref_proj_u']:.4g} +- {res['ref_proj_u_ci']:.2g}",
        f"{'config':<20} {'scale along u':>16} {'T^2':>9} {'p':>9}  verdict",
    ]
    for name, row in res["configs"].items():
        scale = f"{row['scale']:.3f} +- {row['scale_ci']:.3f}"
        if name == res["reference"]:
            lines.append(f"{name:<20} {scale:>16} {'':>9} {'':>9}  reference")
            continue
        verdict = ("differs from the reference" if row["differs"] else
                   "same as the reference on every batch" if row.get("identical") else "consistent with the reference")
        lines.append(f"{name:<20} {scale:>16} {row['t2']:9.2f} {_num(row['p'], 9)}  {verdict}")
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean({"schema": SCHEMA, **result}), indent=1) + "\n")


def _spread(row: dict, key: str, floor: float):
    """(means, errors) of a sweep key against T, every value at least `floor` (for a log axis). errors: [2, T], down
    to the smallest and up to the largest seed's value; None when the sweep has fewer than two seeds' values."""
    import numpy as np

    y = np.maximum(np.array([np.nan if v is None else v for v in row[key]], dtype=float), floor)
    seeds = row.get(f"{key}_seeds")
    if not seeds:
        return y, None
    per = np.maximum(np.array([[np.nan if v is None else v for v in s] for s in seeds], dtype=float), floor)
    if per.shape[1] < 2 or np.isnan(per).all():
        return y, None
    return y, np.vstack([y - np.nanmin(per, axis=1), np.nanmax(per, axis=1) - y]).clip(min=0)


def coincident(sweep: dict, names: list[str], keys=("rel_err", "var_group")) -> list[list[str]]:
    """Groups of configurations whose plotted numbers agree to 9 digits at every T (k1+-reward and k1-reward, ...):
    their lines lie on top of each other, so the figure says so. Those at round-off are left to its note."""
    from klrl import plotstyle

    groups: dict = {}
    for n in names:
        row = sweep["configs"][n]
        if all(v is not None and v < plotstyle.ROUNDOFF for v in row["rel_err"]):
            continue
        sig = tuple(None if v is None else float(f"{v:.9g}") for k in keys for v in row[k])
        groups.setdefault(sig, []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _sweep_lines(axes, sweep: dict, names: list[str], key: str) -> tuple[list[str], list[float]]:
    """On each of `axes` (log y): one line per configuration in plotstyle's encoding (colour = estimator, line
    style = placement) with min-max error bars over the seeds, each configuration a little to the side of T so that
    the bars do not hide each other. Returns the configurations at float round-off at every
    T (drawn without error bars) and every value the others reach (means and error-bar ends)."""
    import numpy as np

    from klrl import plotstyle

    at_roundoff, reach = [], []
    x = np.asarray(sweep["lengths"], dtype=float)
    step = 0.6 * (np.diff(x).min() if len(x) > 1 else 1.0) / max(len(names), 1)  # dodge: error bars side by side
    for i, n in enumerate(names):
        y, err = _spread(sweep["configs"][n], key, plotstyle.FLOOR)
        if bool((y[np.isfinite(y)] < plotstyle.ROUNDOFF).all()):
            at_roundoff.append(n)
            err = None  # seed-to-seed differences of round-off say nothing
        reach += list(y) + ([] if err is None else list(y - err[0]) + list(y + err[1]))
        for ax in axes:
            ax.errorbar(x + (i - (len(names) - 1) / 2) * step, y, yerr=err, capsize=2.5, elinewidth=0.8, lw=1.4, ms=5, label=n,
                        **plotstyle.style(*plotstyle.split_config(n)))
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(sweep["lengths"])
    axes[-1].set_xlabel("response length T")
    return at_roundoff, reach


def write_plot(path: str | Path, sweep: dict) -> list[Path]:
    """`sweep_figure` at `path` (PNG) and its vector twin (PDF) beside it. Returns the paths written."""
    from klrl import plotstyle

    return plotstyle.save(sweep_figure(sweep), path)


def sweep_figure(sweep: dict):
    """The length sweep (the paper's Fig. 2): relative bias (left, a log axis broken between the biased
    configurations and those at float round-off) and variance (right, log) against T, in klrl.plotstyle's encoding,
    with min-max error bars over the sweep's seeds."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from klrl import plotstyle

    names = headline(sweep["configs"]) or list(sweep["configs"])[:8]
    n_seeds = len(sweep.get("seeds") or []) or "?"
    fig, ax = plotstyle.new_mosaic([["bias", "var"], ["zero", "var"]], (12, 6.6), height_ratios=[4, 1])
    flat, reach = _sweep_lines([ax["bias"], ax["zero"]], sweep, names, "rel_err")
    note = f"at float64 round-off: unbiased ({', '.join(flat)})" if flat else "no configuration is unbiased"
    plotstyle.roundoff_split(ax["bias"], ax["zero"], reach, note)
    ax["bias"].set(ylabel=r"relative bias $\|E[g]-\nabla KL\|\,/\,\|\nabla KL\|$", title="bias (exact)")
    _sweep_lines([ax["var"]], sweep, names, "var_group")
    ax["var"].set(ylabel=r"variance tr Cov$[g]$, one group", title="variance (exact)")
    bar = f"error bar: min-max over {n_seeds} seeds" if n_seeds != 1 else "one seed: no error bars"
    marks = [(Line2D([], [], color="0.2", marker="|", ms=10, ls="none"), bar),
             (Patch(color="0.92", lw=0), f"round-off (< {plotstyle.ROUNDOFF:.0e}; 0 drawn at {plotstyle.FLOOR:.0e})")]
    extra = [("marks", marks)]
    same = [(Line2D([], [], ls="none"), " = ".join(g)) for g in coincident(sweep, names)]
    if same:
        extra.append(("same numbers (drawn side by side)", same))
    split = [plotstyle.split_config(n) for n in names]
    plotstyle.sectioned_legend(fig, plotstyle.key_entries([e for e, _ in split], [p for _, p in split], extra))
    fig.suptitle(f"KL gradient estimators against response length T: tabular policy, V={sweep['vocab']}, "
                 f"G={sweep.get('group_size', '?')}, baseline {sweep.get('baseline', '?')}, on-policy; "
                 + ("one random" if n_seeds == 1 else f"mean over {n_seeds} random")
                 + r" $(\pi_{ref}, \pi)$ pair" + "s" * (n_seeds != 1), fontsize="medium")
    return fig


def preset_table(presets: dict) -> str:
    """Every KL configuration's on-policy verdict under each algo preset (terminal)."""
    algos = list(presets)
    names = list(next(iter(presets.values()))["configs"])
    head = [f"algo={a} ({presets[a]['baseline']}, {presets[a]['agg']})" for a in algos]
    rows = [[n] + [presets[a]["configs"][n]["on_policy"].short for a in algos] for n in names]
    widths = [max(len(r[i]) for r in rows + [["config"] + head]) for i in range(len(head) + 1)]
    lines = ["Under each algo preset, on-policy (exact, tabular toy):"]
    for r in [["config"] + head] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)
