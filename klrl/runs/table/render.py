"""Rendering a `klrl.runs.table.aggregate.Report`: markdown (stdout), CSV, LaTeX and the figures (PNG + PDF).

Every file is written atomically (temporary name, then rename), so a table regenerated while someone reads it is
never seen half written. Markdown is pandas' `to_markdown` (tabulate), LaTeX pandas' `Styler.to_latex` (jinja2,
which torch already requires); the figures use klrl.plotstyle, the style `klrl audit --plot` shares.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from klrl import plotstyle
from klrl.runs.rundir import atomic_write
from klrl.runs.table.aggregate import Report, _fmt_rank
from klrl.runs.table.load import STATUSES

EVAL_HEADERS = {"id_pass1": "ID pass@1", "ood_pass1": "OOD pass@1", "id_greedy": "ID greedy",
                "ood_greedy": "OOD greedy"}
CURVES = (("reward", "training reward"), ("kl/exact", r"KL($\pi\,\|\,\pi_{ref}$), exact, per sequence"),
          ("entropy", "entropy (per token)"), ("grad_norm", "gradient norm before clipping"))
ATTENTION = ("diverged", "failed", "stale", "running", "pending", "missing", "unreadable", "unknown")
LIST_AT_MOST = 10


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def fmt_eval(row: pd.Series, col: str) -> str:
    """`0.540 ± 0.099` (seeds), `0.420 ± 0.050†` (a single run's bootstrap CI), `—` (no completed run)."""
    mean, lo, hi, n = row[col], row[f"{col}_lo"], row[f"{col}_hi"], row[f"{col}_n"]
    if not n or not math.isfinite(mean):
        return "—"
    text = f"{mean:.3f}"
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" ± {(hi - lo) / 2:.3f}"
    return text + ("†" if row[f"{col}_ci"] == "bootstrap" else "")


def fmt_runs(row: pd.Series) -> str:
    return ", ".join(f"{row[s]} {s}" for s in STATUSES if row[s])


def display_rows(report: Report) -> pd.DataFrame:
    out = []
    for _, r in report.rows.iterrows():
        d = {"model": r["model"], "estimator": r["estimator"], "placement": r["placement"], "β": f"{r['beta']:g}"}
        if report.split_keys:
            d["other"] = r["other"]
        d.update({h: fmt_eval(r, c) for c, h in EVAL_HEADERS.items()})
        d.update({"stability": r["stability"], "KL": _num(r["kl"]), "entropy": _num(r["entropy"]), "runs": fmt_runs(r)})
        out.append(d)
    return pd.DataFrame(out)


def display_table1(report: Report) -> pd.DataFrame:
    out = []
    for _, r in report.table1.iterrows():
        ranks = {}
        for which in ("id", "ood"):
            rank, detail = _fmt_rank(r[f"{which}_rank"]), r.get(f"{which}_rank_detail", "")
            ranks[which] = f"{rank} ({detail})" if detail and rank != "—" else rank
        out.append({"estimator": r["estimator"], "placement": r["placement"], "gradient (theory)": r["gradient"],
                    "stability (runs)": r["stability"], "ID rank": ranks["id"], "OOD rank": ranks["ood"]})
    return pd.DataFrame(out)


def md_table(df: pd.DataFrame) -> str:
    """A pipe table (pandas' `to_markdown`, i.e. tabulate), cells kept as text; `|` in a cell is escaped."""
    cells = df.astype(str).map(lambda x: x.replace("|", "\\|").replace("\n", " "))
    cells.columns = [str(c).replace("|", "\\|") for c in df.columns]
    return cells.to_markdown(index=False, tablefmt="pipe", disable_numparse=True) + "\n"


def _attention(report: Report) -> list[str]:
    lines = []
    for status in ATTENTION:
        unplaced = {id(r) for r in report.unplaced}
        runs = [r for r in report.runs if r.status == status and id(r) not in unplaced]
        for r in runs[:LIST_AT_MOST]:
            s = r.summary
            if status == "diverged":
                detail = f"at step {r.diverged_at}" + (f": {s['reason']}" if s.get("reason") else "")
            elif status == "failed":
                detail = s.get("error") or "no error recorded"
            elif status in ("running", "stale"):
                detail = f"step {s.get('step', '?')}/{s.get('steps', '?')}"
                detail += ", no live process" if status == "stale" else ""
            elif r.notes:
                detail = r.notes[0]
            else:
                detail = ""
            lines.append(f"- {status}: `{r.name}`" + (f" ({detail})" if detail else ""))
        if len(runs) > LIST_AT_MOST:
            lines.append(f"- … and {len(runs) - LIST_AT_MOST} more {status}")
    for r in report.unplaced:
        lines.append(f"- no readable config (not in the table): `{r.name}` ({r.status})")
    return lines


def markdown(report: Report, roots: list[Path] | None = None) -> str:
    counts = pd.Series([r.status for r in report.runs]).value_counts()
    tally = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    where = ", ".join(f"`{p}`" for p in roots or [])
    n = len(report.runs)
    parts = [f"## Sweep results{': ' + where if where else ''}\n", f"{n} run{'s' * (n != 1)}: {tally}.\n"]
    if report.rows.empty:
        parts.append("\nNo run has a readable config.\n")
    else:
        parts += ["\n", md_table(display_rows(report)), "\n",
                  "± : 95% CI across completed seeds (Student t); † : a single completed seed, ± half the width of its "
                  "bootstrap 95% CI over eval problems (exact bounds in the CSV). Diverged runs count in stability, "
                  "not in the means. KL (kl/exact) and entropy: mean of the last steps of completed runs. "
                  f"Stability rule: {report.rule.describe()} (see docs/table.md).\n",
                  "\n## Table 1 (the paper's Table 1, arXiv 2512.21852): estimator × placement\n\n",
                  md_table(display_table1(report)), "\n",
                  "Gradient: the exact verdict of `klrl audit` for the runs' configuration (docs/theory.md §1.3), "
                  "on-policy unless marked off-policy. Ranks per model by the "
                  "best β's in-domain pass@1, OOD at that β; averaged over models.\n"]
    attention = _attention(report)
    if attention:
        parts += ["\n## Runs needing attention\n\n", "\n".join(attention), "\n"]
    return "".join(parts)


def write_csv(report: Report, path: Path) -> list[Path]:
    """The configuration table at path, Table 1 beside it at <stem>.table1.csv."""
    path = Path(path)
    t1 = path.with_name(f"{path.stem}.table1{path.suffix or '.csv'}")
    atomic_write(path, lambda f: report.rows.to_csv(f, index=False))
    atomic_write(t1, lambda f: report.table1.to_csv(f, index=False))
    return [path, t1]


LATEX_SYMBOLS = {"±": r"$\pm$", "†": r"$^\dagger$", "—": "--", "–": "--", "β": r"$\beta$", "×": r"$\times$",
                 "…": r"\ldots{}", "§": r"\S{}"}


def _symbols(text: str) -> str:
    """The non-ASCII symbols the tables use, as LaTeX (applied after escaping, so its `$` survive)."""
    return "".join(LATEX_SYMBOLS.get(c, c) for c in str(text))


def latex_escape(text: str) -> str:
    """Free text (a caption) escaped the way Styler.format(escape="latex") escapes the cells, symbols converted."""
    from pandas.io.formats.style_render import _escape_latex  # the function escape="latex" applies

    return _symbols(_escape_latex(str(text)))


def latex_table(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs `table` float by pandas' Styler.to_latex: cells and headers LaTeX-escaped, symbols converted."""
    styler = (df.astype(str).style.hide(axis="index")
              .format(escape="latex", formatter=_symbols)
              .format_index(escape="latex", formatter=_symbols, axis=1)
              .set_table_styles([{"selector": "small", "props": ":;"}]))
    return styler.to_latex(environment="table", position="t", position_float="centering", hrules=True,
                           column_format="l" * len(df.columns), caption=latex_escape(caption), label=label)


def latex(report: Report) -> str:
    main = latex_table(display_rows(report), "Results per configuration, seeds aggregated. ± : 95% CI across seeds; "
                       "† : single seed, bootstrap CI over problems. Stability rule: " + report.rule.describe() + ".",
                       "tab:klrl-results")
    t1 = latex_table(display_table1(report), "Estimator × placement: on-policy gradient verdict, stability and "
                     "performance rank (in-domain, out-of-domain).", "tab:klrl-table1")
    return "% Generated by `klrl table`; needs \\usepackage{booktabs}.\n" + main + "\n" + t1


def write_latex(report: Report, path: Path) -> None:
    atomic_write(Path(path), lambda f: f.write(latex(report)))


# "linear", or a number of decades: a log axis (and geometric means) when the logged values span more than that.
CURVE_SCALES = {"reward": "linear", "kl/exact": 1.5, "entropy": 2.0, "grad_norm": 1.0}
BOUNDS = {"kl/exact": (0, None), "entropy": (0, None), "eval/id/pass@1": (0, 1), "eval/ood/pass@1": (0, 1)}
EVAL_CURVES = (("eval/id/pass@1", "in-domain pass@1 (evaluation)"),
               ("eval/ood/pass@1", "out-of-domain pass@1 (evaluation)"))
_EMPTY = ("step", "raw", "mean", "lo", "hi", "n")


def seed_curves(runs, key: str, span: int, log: bool = False) -> tuple[pd.DataFrame, list[tuple[float, float]]]:
    """Per step, over the runs that logged `key` there: the raw mean, the mean of each run's EMA (span `span`) with
    its 95% Student-t CI across runs (NaN where one run), and n; with `log`, all of it on log values (geometric
    means, a multiplicative CI; values <= 0 left out). Also (step, EMA) of each diverged run's last step."""
    raw, smooth, ends = {}, {}, []
    for i, r in enumerate(runs):
        s = r.train[["step", key]].dropna() if key in r.train.columns else None
        if s is None or s.empty:
            continue
        steps, x = s["step"].to_numpy(), s[key].to_numpy(dtype=float)
        if log:
            x = np.log(np.where(x > 0, x, np.nan))
        raw[i], smooth[i] = pd.Series(x, index=steps), pd.Series(plotstyle.ema(x, span), index=steps)
        if r.status == "diverged":
            ends.append((float(steps[-1]), float(smooth[i].iloc[-1])))
    if not raw:
        return pd.DataFrame(columns=list(_EMPTY)), ends
    R, S = pd.DataFrame(raw).sort_index(), pd.DataFrame(smooth).sort_index()
    n, mean = S.notna().sum(axis=1), S.mean(axis=1)
    half = plotstyle.t_halfwidth(S.std(axis=1, ddof=1).fillna(0), n)
    out = pd.DataFrame({"step": S.index, "raw": R.mean(axis=1), "mean": mean, "lo": mean - half, "hi": mean + half,
                        "n": n}).reset_index(drop=True)
    if log:
        out[["raw", "mean", "lo", "hi"]] = np.exp(out[["raw", "mean", "lo", "hi"]].astype(float))
        ends = [(x, float(np.exp(y))) for x, y in ends]
    return out, ends


def eval_curves(runs, key: str) -> pd.DataFrame:
    """Per evaluation step: the mean of `key` over the runs evaluated there with its 95% Student-t CI across them;
    where a single run was, that run's own bootstrap CI (`key`_lo / _hi)."""
    cols = [key, f"{key}_lo", f"{key}_hi"]
    parts = [r.evals.reindex(columns=["step", *cols]).dropna(subset=[key]) for r in runs if key in r.evals.columns]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=list(_EMPTY))
    g = pd.concat(parts).astype(float).groupby("step")
    mean, n = g[key].mean(), g[key].count()
    half = plotstyle.t_halfwidth(g[key].std(ddof=1).fillna(0), n)
    one = n == 1
    lo = (mean - half).where(~one, g[f"{key}_lo"].first())
    hi = (mean + half).where(~one, g[f"{key}_hi"].first())
    return pd.DataFrame({"step": mean.index, "mean": mean, "lo": lo, "hi": hi, "n": n}).reset_index(drop=True)


def _natural(text: str) -> tuple:
    """A sort key that orders the numbers inside text by value: async_level=2 before async_level=10."""
    return tuple((0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
                 for t in re.split(r"(\d+(?:\.\d+)?)", text))


def shade_keys(groups) -> list[tuple[str, str] | None]:
    """The shade of each group: what tells apart groups that share an estimator and a placement (β, and the other
    split keys such as async_level), as (sort key, label); None for a group alone in its estimator and placement:
    it keeps the estimator's own colour, the colour it has in every other figure (`klrl audit --plot`'s too)."""
    by_config: dict = {}
    for g in groups:
        by_config.setdefault((g.estimator, g.placement), []).append(g)
    shared = [gs for gs in by_config.values() if len(gs) > 1]
    vary_beta = any(len({g.beta for g in gs}) > 1 for gs in shared)
    vary_other = any(len({g.other for g in gs}) > 1 for gs in shared)

    def key(g) -> tuple[str, str]:
        parts = [f"β={g.beta:g}"] * vary_beta + [g.other] * vary_other
        return (f"{g.beta:020.10f} {g.other}" if vary_beta else g.other, " ".join(parts))

    return [key(g) if len(by_config[(g.estimator, g.placement)]) > 1 else None for g in groups]


def shade_levels(groups) -> list[tuple[str, str]]:
    """The distinct shades of a figure, the pure colour first: (sort key, label), numbers in their value order."""
    return sorted(dict.fromkeys(k for k in shade_keys(groups) if k), key=lambda k: _natural(k[0]))


def group_styles(groups) -> list[dict]:
    """plotstyle's style of each group (colour = estimator, line style = placement, marker = its options); groups
    that share an estimator and a placement are told apart by shade: the i-th value of β / the other keys across
    the figure is the i-th shade of the estimator's colour (the pure colour first), the same value the same shade
    in every colour."""
    levels = shade_levels(groups)
    out = [plotstyle.style(g.estimator, g.placement) for g in groups]
    for st, k in zip(out, shade_keys(groups)):
        if k:
            st["color"] = plotstyle.shade(st["color"], levels.index(k), len(levels))
    return out


def _band(c: pd.DataFrame, key: str) -> tuple:
    lo, hi = BOUNDS.get(key, (None, None))
    return c["lo"].clip(lower=lo, upper=hi), c["hi"].clip(lower=lo, upper=hi)


def _train_panel(ax, groups, styles, key: str, span: int) -> None:
    """One training quantity: a log axis (and geometric means) when its logged values span more than
    CURVE_SCALES[key] decades (the gradient norm: one), linear otherwise."""
    # KL, entropy and gradient norm are >= 0: an exact 0 (the KL of the first step) is left out, as on a log axis
    values = [v for g in groups for r in g.runs if key in r.train.columns for v in r.train[key].dropna() if v > 0]
    log = CURVE_SCALES[key] != "linear" and plotstyle.spans_decades(values, CURVE_SCALES[key])
    lines, bands = [], []
    for g, st in zip(groups, styles):
        c, ends = seed_curves(g.runs, key, span, log=log)
        if c.empty:
            continue
        lo, hi = _band(c, key)
        plotstyle.draw_curve(ax, c["step"], c["mean"], st, raw=c["raw"] if span > 1 else None, lo=lo, hi=hi,
                             label=g.label, alpha=plotstyle.band_alpha(len(groups)))
        for x, y in ends:
            ax.plot([x], [y], ls="none", marker="x", ms=8, mew=2, color=st["color"])
        lines += [*c["mean"], *c["raw"], *(y for _, y in ends)]
        bands += [*lo, *hi]
    if log:
        ax.set_yscale("log")
        plotstyle.plain_log_ticks(ax)
    plotstyle.fit_ylim(ax, lines, bands, log)


def _eval_panel(ax, groups, styles, key: str) -> bool:
    lines, bands = [], []
    for g, st in zip(groups, styles):
        c = eval_curves(g.runs, key)
        if c.empty:
            continue
        lo, hi = _band(c, key)
        plotstyle.draw_curve(ax, c["step"], c["mean"], st, lo=lo, hi=hi, markers=len(c), label=g.label,
                             alpha=plotstyle.band_alpha(len(groups)))
        lines, bands = lines + list(c["mean"]), bands + [*lo, *hi]
    plotstyle.fit_ylim(ax, lines, bands)
    return bool(lines)


def short_label(text: str) -> str:
    """A legend label with each config key cut to its last part: `algo.is_truncate=8.0` -> `is_truncate=8.0`."""
    return re.sub(r"(?<![\w.])(?:[A-Za-z_]\w*\.)+(?=\w+=)", "", text)


def seeds_drawn(group) -> int:
    """n of a configuration in the figure: its runs with training records (diverged and running ones included)."""
    return sum(len(r.train) > 0 for r in group.runs)


def _shade_section(groups) -> list:
    from matplotlib.lines import Line2D

    levels = shade_levels(groups)
    if len(levels) < 2:
        return []
    base = next((c for c in (plotstyle.estimator_color(g.estimator) for g in groups) if c != plotstyle.PALETTE["none"]),
                plotstyle.PALETTE["none"])  # a colour that darkens, as every one but none's grey does
    items = [(Line2D([], [], color=plotstyle.shade(base, i, len(levels)), lw=3), short_label(lab))
             for i, (_, lab) in enumerate(levels)]
    return [("shade of a colour", items)]


def _legend(fig, groups, styles, span: int, diverged: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    several = max(seeds_drawn(g) for g in groups) > 1
    raw = "raw mean over seeds" if several else "raw run"
    drawn = [(Line2D([], [], color="0.2", lw=0.6, alpha=0.4), raw)] * (span > 1)
    drawn += [(Line2D([], [], color="0.2", lw=1.6), f"EMA, span {span} steps" if span > 1 else "no smoothing")]
    drawn += [(Patch(color="0.2", alpha=0.2, lw=0), "95% CI across seeds (t)")] * several
    single_eval = any(seeds_drawn(g) == 1 and len(r.evals) > 1 for g in groups for r in g.runs)
    drawn += [(Patch(color="0.2", alpha=0.2, lw=0), "pass@1, n=1: bootstrap 95% CI")] * single_eval
    if diverged:
        drawn.append((Line2D([], [], color="0.2", ls="none", marker="x", ms=7, mew=2), "diverged run's last step"))
    configs = [(Line2D([], [], lw=1.6, ms=4, **st), short_label(f"{g.label} (n={seeds_drawn(g)})"))
               for g, st in zip(groups, styles)]
    sections = plotstyle.key_entries([g.estimator for g in groups], [g.placement for g in groups],
                                     _shade_section(groups) + [("drawn", drawn), ("configuration (n = seeds)", configs)])
    plotstyle.sectioned_legend(fig, sections, max_rows=max(9, min(13, len(groups) + 1)))  # configurations: one column


def _title(model: str, groups, span: int) -> str:
    """What the figure shows: n, the smoothing and what the bands are, stated once (the legend repeats n)."""
    ns = sorted({seeds_drawn(g) for g in groups})
    smooth = f"EMA (span {span} steps) over the faint raw trace" if span > 1 else "not smoothed"
    if ns == [1]:
        seeds = "one seed per configuration (n=1), so no band across seeds"
    else:
        n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}, per configuration in the legend"
        seeds = f"mean over seeds ({n}), band: 95% Student-t CI across seeds" + (" (none where n=1)" if 1 in ns else "")
    return (f"{model}: {seeds}\ntraining curves: {smooth}; evaluation pass@1 at every evaluation step"
            + (", a single seed's band: its bootstrap 95% CI over the problems" if 1 in ns else ""))


def model_figure(model: str, groups, span: int):
    """The figure of one model: training curves (2 x 2) and, when there are evaluation records, pass@1 (1 x 2)."""
    from matplotlib.ticker import MaxNLocator

    styles = group_styles(groups)
    has_eval = any(k in r.evals.columns for g in groups for r in g.runs for k, _ in EVAL_CURVES)
    wide = 12 + 2 * (len(groups) > 8 or bool(shade_levels(groups)))  # room for the legend's extra columns
    fig, axes = plotstyle.new_figure(3 if has_eval else 2, 2, (wide, 13 if has_eval else 9.5), sharex=True)
    for ax, (key, title) in zip(axes.ravel(), CURVES):
        _train_panel(ax, groups, styles, key, span)
        ax.set_title(title + (" (log scale, geometric mean)" if ax.get_yscale() == "log" else ""))
    if has_eval:
        for ax, (key, title) in zip(axes[2], EVAL_CURVES):
            if not _eval_panel(ax, groups, styles, key):
                ax.text(0.5, 0.5, "no evaluation records", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    diverged = any(r.status == "diverged" and len(r.train) for g in groups for r in g.runs)
    _legend(fig, groups, styles, span, diverged)
    fig.suptitle(_title(model, groups, span), fontsize="medium")
    return fig


def write_plots(report: Report, out_dir: Path, span: int | None = None) -> list[Path]:
    """Per model, `curves_<model>.png` and its vector twin `.pdf`: reward, KL, entropy and gradient-norm training
    curves of each configuration (EMA of span `span`, default about 1/10 of the run, over the faint raw mean, with
    a 95% t-CI band across seeds) and the in-/out-of-domain pass@1 evaluations with their CIs. Every run with
    records is drawn, diverged and running ones too (up to where they are)."""
    out_dir = Path(out_dir)
    written = []
    for model in dict.fromkeys(g.model for g in report.groups):
        groups = [g for g in report.groups if g.model == model and any(len(r.train) for r in g.runs)]
        if not groups:
            continue
        steps = max(len(r.train) for g in groups for r in g.runs)
        fig = model_figure(model, groups, span or plotstyle.auto_span(steps))
        written += plotstyle.save(fig, out_dir / f"curves_{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.png")
    return written
