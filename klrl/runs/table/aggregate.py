"""`klrl table SWEEP_DIR...`: the results table of a sweep, and the paper's qualitative Table 1 filled from its runs.

One row per configuration (model, estimator, placement with its non-default options, beta, and any other config key
that varies within a group of otherwise equal runs), seeds aggregated:

- evaluation (in-domain / out-of-domain pass@1 and greedy accuracy) of the *completed* runs: the mean with a 95%
  Student-t CI across seeds when two or more seeds completed, otherwise that run's own bootstrap CI over eval problems.
  A diverged run has no final evaluation of its own (its summary repeats the last evaluation before the divergence),
  so it counts in the stability column, not in these means;
- final KL (kl/exact) and entropy: the mean over the last `window` logged training steps, averaged over completed runs;
- stability, from each finished run under the collapse rule below;
- how many runs are completed / diverged / failed / running / pending / missing.

Collapse rule (`CollapseRule`), applied to each completed run; a diverged run (non-finite loss, log-probs or gradient)
is "diverged at step s" whatever its curves:

- reward collapse: the w-step trailing mean of the training reward ends below `reward_frac` x its initial value (the
  mean of the first w steps) and stays below it from some step s to the end of the run;
- eval collapse: in-domain pass@1 ends more than `eval_drop` (absolute) below its value at step 0 and stays below that
  level from the evaluation at step s to the end (needs the step-0 evaluation; periodic evaluations give s);
- either makes the run "collapsed at s" (the earlier s of the two); a run that dips and recovers is not collapsed;
- entropy collapse: the w-step trailing mean of the policy's per-token entropy ends below `entropy_frac` x its initial
  value and stays below it from s on. Reported separately ("entropy collapse at s"), since a policy can turn nearly
  deterministic while still solving the task; `entropy_frac=0` turns it off.

w = min(`window`, number of logged training steps // 4), at least 1, so short runs are judged on their own scale.

Table 1 (the paper's Table 1, arXiv 2512.21852): one row per estimator x placement x verdict, with the gradient
verdict `klrl audit` computes for the runs' exact configuration (`gradient_verdict`), the stability counts over all its finished runs, and its performance rank per
model: each configuration is represented by its best beta by in-domain pass@1, ranked by that pass@1 (ID rank) and by
the out-of-domain pass@1 at that same beta (OOD rank); with several models the ranks are averaged.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from klrl.core.estimators import ESTIMATORS
from klrl.runs.rundir import OPERATIONAL
from klrl.runs.table.load import FINISHED, STATUSES, Run

EVAL_METRICS = {  # column prefix -> key in a run's final_eval, without the "eval/" prefix
    "id_pass1": "id/pass@1",
    "ood_pass1": "ood/pass@1",
    "id_greedy": "id/greedy",
    "ood_greedy": "ood/greedy",
}
ESTIMATOR_ORDER = ("none", *ESTIMATORS)  # the registry's order
PLACEMENT_ORDER = ("none", "reward", "loss", "both")
# Config keys that say how a run was executed, not what it computes; they never split rows.
OPERATIONAL_KEYS = OPERATIONAL | {"seed"}  # how runs executed (and their seeds, which rows aggregate): never rows


# --- theory -------------------------------------------------------------------------------------------------------

def gradient_verdict(cfg: dict) -> str:
    """The Table 1 gradient column for a run's config: the exact verdict `klrl audit` computes for it
    (klrl.audit.verdicts, on- or off-policy as the run trained), never typed here."""
    from klrl.audit.verdicts import config_verdict
    from klrl.config.specs import is_off_policy

    if ((cfg.get("estimator") or {}).get("name") or "none") == "none":
        return "no KL"
    try:
        v = config_verdict(cfg)
    except Exception as e:  # a config from another klrl version (an estimator no longer registered, ...)
        return f"unknown ({type(e).__name__})"
    return f"{v.short} (off-policy)" if is_off_policy(cfg) else v.short


def placement_label(placement: dict) -> str:
    """`reward`, or with its non-default options: `reward[togo]`, `loss[is]`, `both[togo,reward-is,loss-is]`."""
    name = str(placement.get("name", "?"))
    tags = []
    if placement.get("reward_form") not in (None, "seqsum"):
        tags.append(str(placement["reward_form"]))
    if placement.get("reward_is_weight"):
        tags.append("reward-is" if name == "both" else "is")
    if placement.get("loss_is_weight"):
        tags.append("loss-is" if name == "both" else "is")
    return f"{name}[{','.join(tags)}]" if tags else name


# --- the collapse rule --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollapseRule:
    window: int = 10  # steps of the trailing mean, capped at a quarter of the run
    reward_frac: float = 0.5  # collapsed: smoothed reward ends and stays below this fraction of its initial value
    eval_drop: float = 0.2  # collapsed: in-domain pass@1 ends and stays this much (absolute) below its step-0 value
    entropy_frac: float = 0.05  # entropy collapse: smoothed entropy below this fraction of its initial value; 0 = off

    def smoothing(self, n_steps: int) -> int:
        return max(1, min(self.window, n_steps // 4))

    def describe(self) -> str:
        return (f"window={self.window}, reward_frac={self.reward_frac:g}, eval_drop={self.eval_drop:g}, "
                f"entropy_frac={self.entropy_frac:g}")


@dataclass(frozen=True)
class Stability:
    kind: str  # stable | collapsed | entropy collapse | diverged | unknown
    step: int | None = None
    reasons: tuple[str, ...] = ()


STABILITY_ORDER = ("diverged", "collapsed", "entropy collapse", "stable", "unknown")


def stays_below(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """First step of the final stretch of values below threshold; None if the last value is not below it."""
    below = np.asarray(values, dtype=float) < threshold  # NaN compares False: an unknown value breaks a stretch
    if len(below) == 0 or not below[-1]:
        return None
    above = np.flatnonzero(~below)
    return int(steps[above[-1] + 1 if len(above) else 0])


def curve_collapse(train: pd.DataFrame, key: str, frac: float, rule: CollapseRule) -> int | None:
    """Step from which the smoothed training curve `key` stays below frac x its initial level, or None."""
    if frac <= 0 or key not in train.columns:
        return None
    s = train[["step", key]].dropna()
    if len(s) < 2:
        return None
    w = rule.smoothing(len(s))
    smooth = s[key].rolling(w).mean().to_numpy()[w - 1 :]
    initial = smooth[0]
    if not initial > 0:  # a curve that starts at zero cannot fall by a fraction
        return None
    return stays_below(s["step"].to_numpy()[w - 1 :], smooth, frac * initial)


def eval_collapse(run: Run, rule: CollapseRule, key: str = "eval/id/pass@1") -> int | None:
    start = run.initial_eval.get(key)
    if start is None or not math.isfinite(start):
        return None
    ev = run.evals
    later = ev[ev["step"] > 0][["step", key]].dropna() if key in ev.columns else ev.iloc[0:0]
    if later.empty and key in run.final_eval:  # metrics.jsonl lost; the summary still has the last evaluation
        later = pd.DataFrame({"step": [run.summary.get("step", 0)], key: [run.final_eval[key]]})
    if later.empty:
        return None
    return stays_below(later["step"].to_numpy(), later[key].to_numpy(), start - rule.eval_drop)


def run_stability(run: Run, rule: CollapseRule) -> Stability | None:
    """The verdict on one finished run; None for runs that have not finished (running, pending, failed, ...)."""
    if run.status == "diverged":
        return Stability("diverged", run.diverged_at)
    if run.status != "completed":
        return None
    hits = {"reward": curve_collapse(run.train, "reward", rule.reward_frac, rule), "eval": eval_collapse(run, rule)}
    hits = {k: v for k, v in hits.items() if v is not None}
    if hits:
        return Stability("collapsed", min(hits.values()), tuple(hits))
    ent = curve_collapse(run.train, "entropy", rule.entropy_frac, rule)
    if ent is not None:
        return Stability("entropy collapse", ent, ("entropy",))
    if run.train.empty and run.evals.empty and not run.final_eval:
        return Stability("unknown")
    return Stability("stable")


def describe_stability(verdicts: list[Stability], steps: bool = True) -> str:
    """`stable`, `collapsed @12 (reward, eval)`, or for several runs `diverged @15 1/3; stable 2/3`."""
    verdicts = [v for v in verdicts if v is not None]
    if not verdicts:
        return "—"
    parts = []
    for kind in STABILITY_ORDER:
        vs = [v for v in verdicts if v.kind == kind]
        if not vs:
            continue
        text = kind
        at = sorted(v.step for v in vs if v.step is not None)
        if steps and at:
            text += " @" + ",".join(map(str, at))
        reasons = sorted({r for v in vs for r in v.reasons} - {"entropy"})
        if reasons:
            text += f" ({', '.join(reasons)})"
        if len(verdicts) > 1:
            text += f" {len(vs)}/{len(verdicts)}"
        parts.append(text)
    return "; ".join(parts)


# --- aggregation --------------------------------------------------------------------------------------------------

def t975(df: int) -> float:
    """The two-sided 95% Student-t critical value t_{0.975, df} (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def aggregate_eval(runs: list[Run], key: str) -> dict:
    """mean, lo, hi, n and how the CI was made ("seeds" across runs, "bootstrap" of the single run, "" for none)."""
    key = f"eval/{key}"
    vals = [(r.final_eval[key], r) for r in runs if isinstance(r.final_eval.get(key), (int, float))]
    n = len(vals)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "ci": ""}
    if n == 1:
        v, r = vals[0]
        return {"mean": v, "lo": r.final_eval.get(key + "_lo", math.nan), "hi": r.final_eval.get(key + "_hi", math.nan),
                "n": 1, "ci": "bootstrap"}
    x = np.array([v for v, _ in vals], dtype=float)
    half = t975(n - 1) * x.std(ddof=1) / math.sqrt(n)
    return {"mean": x.mean(), "lo": x.mean() - half, "hi": x.mean() + half, "n": n, "ci": "seeds"}


def final_value(run: Run, key: str, rule: CollapseRule) -> float:
    if key not in run.train.columns:
        return math.nan
    s = run.train[key].dropna()
    return float(s.tail(rule.smoothing(len(s))).mean()) if len(s) else math.nan


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> JSON text of each leaf value (hashable, and 0.1 vs 0.10 compare equal)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def basic_key(cfg: dict) -> tuple[str, str, str, float]:
    model = cfg.get("model") or {}
    est = (cfg.get("estimator") or {}).get("name", "?")
    place = placement_label(cfg.get("placement") or {})
    return str(model.get("name", "?")), str(est), place, float(cfg.get("beta", math.nan))


def _is_key_field(k: str) -> bool:
    return k in ("model.name", "estimator.name", "beta") or k.startswith("placement.")


def split_keys(configs: list[dict]) -> list[str]:
    """Config keys, beyond the basic key, that must split rows: those that vary among runs of one basic key.

    Keys that vary only together with the basic key (model.hf_id with model.name) would only repeat it.
    """
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for cfg in configs:
        groups[basic_key(cfg)].append(flatten(cfg))
    keys = set()
    for flats in groups.values():
        for k in set().union(*flats):
            if k.split(".")[0] in OPERATIONAL_KEYS or _is_key_field(k):
                continue
            if len({f.get(k, "<absent>") for f in flats}) > 1:
                keys.add(k)
    return sorted(keys)


def _other(cfg: dict, keys: list[str]) -> str:
    flat = flatten(cfg)
    return ", ".join(f"{k}={json.loads(flat[k]) if k in flat else '—'}" for k in keys)


def _order(value: str, order: tuple) -> tuple:
    base = value.split("[")[0]
    return (order.index(base) if base in order else len(order), value)


@dataclass
class Group:
    model: str
    estimator: str
    placement: str
    beta: float
    other: str
    config: dict  # the first run's: every run of a group shares what decides the gradient
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        text = f"{self.estimator}/{self.placement} β={self.beta:g}"
        return f"{text} {self.other}" if self.other else text


@dataclass
class Report:
    rows: pd.DataFrame  # one row per configuration, numbers unformatted (the CSV)
    table1: pd.DataFrame  # one row per estimator x placement
    groups: list[Group]  # in the order of `rows`, with their runs (for plots)
    unplaced: list[Run]  # runs whose config could not be read (or composed, for missing ones)
    runs: list[Run]
    rule: CollapseRule
    split_keys: list[str]


def group_runs(runs: list[Run]) -> tuple[list[Group], list[Run], list[str]]:
    placed = [r for r in runs if r.config is not None]
    # A missing run's config is composed from today's conf/, which may have gained keys since the sweep ran: only
    # the runs that exist decide which keys split rows.
    existing = [r.config for r in placed if r.status != "missing"]
    keys = split_keys(existing or [r.config for r in placed])
    groups: dict[tuple, Group] = {}
    for r in placed:
        model, est, place, beta = basic_key(r.config)
        other = _other(r.config, keys)
        g = groups.setdefault((model, est, place, beta, other),
                              Group(model, est, place, beta, other, r.config))
        g.runs.append(r)
    ordered = sorted(groups.values(), key=lambda g: (g.model, _order(g.estimator, ESTIMATOR_ORDER),
                                                     _order(g.placement, PLACEMENT_ORDER), g.beta, g.other))
    return ordered, [r for r in runs if r.config is None], keys


def _seed(r: Run):
    return (r.config or {}).get("seed")


def _seed_order(seed) -> tuple:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))  # numeric order: 2 before 10


def row_of(g: Group, rule: CollapseRule) -> dict:
    completed = [r for r in g.runs if r.status == "completed"]
    verdicts = [run_stability(r, rule) for r in g.runs if r.status in FINISHED]
    row: dict = {"model": g.model, "estimator": g.estimator, "placement": g.placement, "beta": g.beta,
                 "other": g.other, "gradient": gradient_verdict(g.config),
                 "runs": len(g.runs)}
    for s in STATUSES:
        row[s] = sum(r.status == s for r in g.runs)
    row["seeds"] = ",".join(map(str, sorted({_seed(r) for r in g.runs}, key=_seed_order)))
    for col, key in EVAL_METRICS.items():
        agg = aggregate_eval(completed, key)
        row[col], row[f"{col}_lo"], row[f"{col}_hi"], row[f"{col}_n"] = agg["mean"], agg["lo"], agg["hi"], agg["n"]
        row[f"{col}_ci"] = agg["ci"]
    starts = [r.initial_eval.get("eval/id/pass@1") for r in completed]
    starts = [s for s in starts if isinstance(s, (int, float))]
    row["id_pass1_start"] = float(np.mean(starts)) if starts else math.nan
    row["stability"] = describe_stability(verdicts)
    for kind in STABILITY_ORDER:
        row[f"n_{kind.replace(' ', '_')}"] = sum(v is not None and v.kind == kind for v in verdicts)
    for col, key in (("kl", "kl/exact"), ("entropy", "entropy"), ("reward", "reward"), ("grad_norm", "grad_norm")):
        vals = [final_value(r, key, rule) for r in completed]
        vals = [v for v in vals if math.isfinite(v)]
        row[col] = float(np.mean(vals)) if vals else math.nan
    return row


def _fmt_rank(x: float) -> str:
    return "—" if not math.isfinite(x) else (f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}")


RANK_COLUMNS = ["model", "estimator", "placement", "gradient", "beta", "id_pass1", "ood_pass1", "id_rank", "ood_rank"]


def table1_of(rows: pd.DataFrame, groups: list[Group], rule: CollapseRule) -> pd.DataFrame:
    """Paper Table 1 from the rows: gradient verdict, stability over all finished runs, performance rank."""
    if rows.empty:
        return pd.DataFrame(columns=["estimator", "placement", "gradient", "stability", "id_rank", "ood_rank"])
    ranks = []
    for model, sub in rows.groupby("model", sort=True):
        done = sub[sub["id_pass1"].notna()]
        if done.empty:
            continue
        best = done.loc[done.groupby(["estimator", "placement", "gradient"], sort=False)["id_pass1"].idxmax()].copy()
        best["id_rank"] = best["id_pass1"].rank(ascending=False, method="min")
        best["ood_rank"] = best["ood_pass1"].rank(ascending=False, method="min")
        ranks.append(best[RANK_COLUMNS])
    ranked = pd.concat(ranks) if ranks else pd.DataFrame(columns=RANK_COLUMNS)
    several = rows["model"].nunique() > 1
    out = []
    verdict_of = dict(zip(map(id, groups), rows["gradient"]))
    for (est, place, grad), sub in rows.groupby(["estimator", "placement", "gradient"], sort=False):
        gs = [g for g in groups if (g.estimator, g.placement, verdict_of[id(g)]) == (est, place, grad)]
        verdicts = [run_stability(r, rule) for g in gs for r in g.runs if r.status in FINISHED]
        mine = ranked[(ranked["estimator"] == est) & (ranked["placement"] == place) & (ranked["gradient"] == grad)]
        rec = {"estimator": est, "placement": place, "gradient": grad,
               "stability": describe_stability(verdicts, steps=False), "finished_runs": len(verdicts),
               "id_rank": float(mine["id_rank"].mean()) if len(mine) else math.nan,
               "ood_rank": float(mine["ood_rank"].mean()) if len(mine) else math.nan}
        if several:
            rec["id_rank_detail"] = ", ".join(f"{m}: {_fmt_rank(v)}" for m, v in zip(mine["model"], mine["id_rank"]))
            rec["ood_rank_detail"] = ", ".join(f"{m}: {_fmt_rank(v)}" for m, v in zip(mine["model"], mine["ood_rank"]))
        else:
            rec["id_rank_detail"] = "; ".join(f"{a:.3f} @β={b:g}" for a, b in zip(mine["id_pass1"], mine["beta"]))
            rec["ood_rank_detail"] = "; ".join(
                f"{a:.3f} @β={b:g}" if math.isfinite(a) else "—" for a, b in zip(mine["ood_pass1"], mine["beta"]))
        out.append(rec)
    t1 = pd.DataFrame(out)
    order = [(_order(e, ESTIMATOR_ORDER), _order(p, PLACEMENT_ORDER)) for e, p in zip(t1["estimator"], t1["placement"])]
    return t1.iloc[sorted(range(len(t1)), key=order.__getitem__)].reset_index(drop=True)


def make_report(runs: list[Run], rule: CollapseRule = CollapseRule()) -> Report:
    groups, unplaced, keys = group_runs(runs)
    rows = pd.DataFrame([row_of(g, rule) for g in groups])
    return Report(rows, table1_of(rows, groups, rule), groups, unplaced, runs, rule, keys)
