"""Rendering a `klrl.runs.table.aggregate.Report`: markdown (stdout), CSV, LaTeX and PNG training curves.

Every file is written atomically (temporary name, then rename), so a table regenerated while someone reads it is
never seen half written. Markdown and LaTeX are produced here rather than by pandas, whose renderers need optional
packages (tabulate, jinja2) that klrl does not depend on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from klrl.runs.rundir import atomic_write
from klrl.runs.table.aggregate import Report, _fmt_rank
from klrl.runs.table.load import STATUSES

EVAL_HEADERS = {"id_pass1": "ID pass@1", "ood_pass1": "OOD pass@1", "id_greedy": "ID greedy",
                "ood_greedy": "OOD greedy"}
CURVES = (("reward", "training reward"), ("kl/exact", "KL (exact, per sequence)"), ("entropy", "entropy (per token)"),
          ("grad_norm", "gradient norm (before clipping)"))
ATTENTION = ("diverged", "failed", "running", "pending", "missing", "unknown")
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
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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
            elif status == "running":
                detail = f"step {s.get('step', '?')}/{s.get('steps', '?')}"
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
                  "\n## Table 1 (paper.md §3): estimator × placement\n\n", md_table(display_table1(report)), "\n",
                  "Gradient: theory (paper.md §1.3–1.4), on-policy unless marked off-policy. Ranks per model by the "
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


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_SYMBOLS = {"±": r"$\pm$", "†": r"$^\dagger$", "—": "--", "–": "--", "β": r"$\beta$", "×": r"$\times$",
                 "…": r"\ldots{}", "§": r"\S{}"}


def latex_escape(text: str) -> str:
    text = "".join(LATEX_SPECIAL.get(c, c) for c in str(text))
    return "".join(LATEX_SYMBOLS.get(c, c) for c in text)


def latex_table(df: pd.DataFrame, caption: str, label: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{label}}}", r"\begin{tabular}{" + "l" * len(df.columns) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(x) for x in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def latex(report: Report) -> str:
    main = latex_table(display_rows(report), "Results per configuration, seeds aggregated. ± : 95% CI across seeds; "
                       "† : single seed, bootstrap CI over problems. Stability rule: " + report.rule.describe() + ".",
                       "tab:klrl-results")
    t1 = latex_table(display_table1(report), "Estimator × placement: on-policy gradient verdict, stability and "
                     "performance rank (in-domain, out-of-domain).", "tab:klrl-table1")
    return "% Generated by `klrl table`; needs \\usepackage{booktabs}.\n" + main + "\n" + t1


def write_latex(report: Report, path: Path) -> None:
    atomic_write(Path(path), lambda f: f.write(latex(report)))


def curve_stats(runs, key: str) -> pd.DataFrame:
    """Per step: mean, min and max of `key` over the runs that logged that step."""
    parts = [r.train[["step", key]] for r in runs if key in r.train.columns and len(r.train)]
    if not parts:
        return pd.DataFrame(columns=["step", "mean", "min", "max", "n"])
    df = pd.concat(parts).dropna()
    return df.groupby("step")[key].agg(["mean", "min", "max", "count"]).rename(columns={"count": "n"}).reset_index()


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """One PNG per model: reward, KL, entropy and gradient-norm curves of each configuration, mean over its runs with
    a min-max band. Every run with training records is drawn, diverged and running ones too (up to where they are)."""
    from matplotlib.figure import Figure  # no pyplot: no global state and no display backend needed
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    written = []
    for model in dict.fromkeys(g.model for g in report.groups):
        groups = [g for g in report.groups if g.model == model and any(len(r.train) for r in g.runs)]
        if not groups:
            continue
        fig = Figure(figsize=(12, 8.5), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True).ravel()
        colors = [f"C{i % 10}" for i in range(len(groups))]
        styles = ["-", "--", ":", "-."]
        for i, (g, color) in enumerate(zip(groups, colors)):
            for ax, (key, title) in zip(axes, CURVES):
                st = curve_stats(g.runs, key)
                if st.empty:
                    continue
                ax.plot(st["step"], st["mean"], color=color, ls=styles[(i // 10) % len(styles)], lw=1.3,
                        label=f"{g.label} (n={int(st['n'].max())})")
                if st["n"].max() > 1:
                    ax.fill_between(st["step"], st["min"], st["max"], color=color, alpha=0.15, lw=0)
        for ax, (_, title) in zip(axes, CURVES):
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[2:]:
            ax.set_xlabel("step")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize="small")
        fig.suptitle(f"{model}: mean over seeds, band = min-max")
        path = out_dir / f"curves_{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
        written.append(path)
    return written
