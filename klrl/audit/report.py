"""Printing, JSON and the plot: presentation only, no computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "klrl.audit/2"
LEGEND = """rev = grad KL(pi||pi_ref) (the objective's gradient); fwd = grad KL(pi_ref||pi) (sequence level);
Fctx = sum_s P(s) grad KL(pi_ref(.|s)||pi(.|s)) (per-context forward KL);
Rtok = sum_s P(s) grad KL(pi(.|s)||pi_ref(.|s)) (token-level partial reverse KL); @old: over pi_old's contexts.
pi and pi_ref are the distributions sampled from (temperature, top-p; see klrl/distributions.py).
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
    head = (f"{'config':<22} {'verdict (' + main + ')':<{width}} {'|bias|':>7} {'cos':>6} {'cos':>6} "
            f"{'var':>8} {'var':>8}")
    sub = f"{'':<22} {'':<{width}} {'/|rev|':>7} {'rev':>6} {'fwd':>6} {'1':>8} {'G=' + str(G):>8}"
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
        line = (f"{name:<22} {row['verdict']:<{width}} {_num(row['vs_rev']['rel_err'], 7)} "
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


def write_plot(path: str | Path, sweep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sweep["lengths"]
    names = headline(sweep["configs"]) or list(sweep["configs"])[:8]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(names):
        row = sweep["configs"][n]
        style = {"color": f"C{i}", "marker": "os^vDPX*"[i % 8], "ls": "-" if n.startswith("k1") else "--"}
        axes[0].plot(Ts, row["rel_err"], label=n, **style)
        axes[1].plot(Ts, [max(v, 1e-300) for v in row["var_group"]], label=n, **style)
    axes[0].set(xlabel="response length T", ylabel="|E[g] - grad KL| / |grad KL|", title="bias (exact)")
    axes[1].set(xlabel="response length T", ylabel="tr Cov[g], one group", title="variance (exact)", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"KL gradient estimators on a tabular policy, V={sweep['vocab']}, G={sweep.get('group_size', '?')}, "
                 f"baseline {sweep.get('baseline', '?')}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
