"""The exact audit: every selected configuration on one enumerable policy, on- and off-policy, and against T.

Conventions: task rewards 0, so the estimator's expectation is the KL contribution itself; means are per unit
beta and compared with grad KL(pi||pi_ref) directly. The single-sample estimator is G = 1 without a baseline (plain
REINFORCE); the batch estimator is one group of G with the configuration's baseline and aggregation, exactly as
`policy_loss` forms it for a batch of one prompt. The words come from `klrl.audit.verdicts.judge`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from klrl.audit import exact as ex
from klrl.audit.configs import AuditConfig
from klrl.audit.policies import TRIPLES, Triple, tabular_triple
from klrl.audit.verdicts import judge
from klrl.core.distributions import Sampling
from klrl.core.losses import PGSpec
from klrl.core.toy import expected_gradient, log_probs


def seq_kl(p, q, sampling: Sampling = Sampling()) -> float:
    """Exact sequence-level KL(p || q) between two sampling distributions, by enumeration (q cut to p's support)."""
    from klrl.core.toy import dist_logits, support

    with torch.no_grad():
        seqs, mask = p.all_sequences()
        logits = dist_logits(p, seqs, sampling, keep=False)
        lp = log_probs(p, seqs, mask, sampling, keep=False).sum(-1)
        lq = log_probs(q, seqs, mask, sampling, support=support(logits, sampling), keep=False).sum(-1)
        live = torch.isfinite(lp)
        return float((lp[live].exp() * (lp[live] - lq[live])).sum())


def _as_pg(pg: PGSpec | str, length: int) -> PGSpec:
    pg = pg if isinstance(pg, PGSpec) else PGSpec(baseline=pg)
    return replace(pg, agg_norm=float(length)) if pg.agg == "seq_mean_token_sum_norm" else pg


def _single(pg: PGSpec) -> PGSpec:
    """One sample, no baseline: the same aggregation and ratio handling."""
    return replace(pg, baseline="none")


def _needs_groups(c: AuditConfig) -> bool:
    return c.reward_is_weight  # the leave-one-out inside the sequence-weighted penalty needs G >= 2


def audit_regime(tr: Triple, configs: list[AuditConfig], G: int, pg: PGSpec | str, off_policy: bool,
                 sampling: Sampling = Sampling()) -> dict:
    """One table: every configuration's exact mean, bias, decomposition, verdict and variances."""
    pg = _as_pg(pg, tr.policy.length)
    behaviour = tr.old if off_policy else None
    basis = ex.targets(tr.policy, tr.ref, tr.old if off_policy else None, sampling)
    en = ex.enumerate_groups(tr.policy, tr.ref, G, behaviour, sampling)
    en1 = ex.enumerate_groups(tr.policy, tr.ref, 1, behaviour, sampling)
    rows = {}
    for c in configs:
        beta = c.spec.beta or 1.0
        mean = expected_gradient(tr.policy, tr.ref, c.spec, pg, G, behaviour=behaviour, sampling=sampling).detach()
        mean = mean / beta
        mean_cj, var_g = ex.moments(en, ex.loss_coefficients(en, c.spec, pg))
        var_1 = None if _needs_groups(c) else ex.moments(en1, ex.loss_coefficients(en1, c.spec, _single(pg)))[1]
        v = judge(mean, basis)
        rows[c.name] = {
            "estimator": c.estimator, "placement": c.placement, "reward_form": c.reward_form,
            "reward_is_weight": c.reward_is_weight, "loss_is_weight": c.loss_is_weight, "overrides": c.overrides,
            "grad_norm": float(mean.norm()),
            "vs_rev": ex.compare(mean, basis["rev"]), "vs_fwd": ex.compare(mean, basis["fwd"]),
            "decomposition": None if v.parts is None else dict(v.parts), "verdict": v.text, "label": v.label,
            "scale": v.scale, "fit": v.fit, "residual": v.residual, "unbiased": v.unbiased,
            "var_single": None if var_1 is None else var_1 / beta**2, "var_group": var_g / beta**2,
            # The variance route (chain rule through c and J) must reproduce toy.expected_gradient's mean.
            "mean_check": float((mean_cj / beta - mean).norm() / max(float(basis["rev"].norm()), 1e-300)),
        }
    return {
        "kl_pi_ref": seq_kl(tr.policy, tr.ref, sampling),
        "kl_old_pi": seq_kl(tr.old, tr.policy, sampling) if off_policy else 0.0,
        "target_norms": {k: float(v.norm()) for k, v in basis.items()}, "configs": rows,
    }


def audit_policy(kind: str, vocab: int, length: int, G: int, pg: PGSpec | str, distance: float, off_distance: float,
                 seed: int, configs: list[AuditConfig], sampling: Sampling = Sampling(), eos: int | None = None
                 ) -> dict:
    tr = TRIPLES[kind](vocab, length, distance, off_distance, seed, eos=eos)
    return {
        "n_params": tr.policy.theta.numel(),
        "on_policy": audit_regime(tr, configs, G, pg, False, sampling),
        "off_policy": audit_regime(tr, configs, G, pg, True, sampling),
    }


def length_sweep(vocab: int, lengths: list[int], G: int, pg: PGSpec | str, distance: float, seeds: list[int],
                 configs: list[AuditConfig], sampling: Sampling = Sampling(), eos: bool = False) -> dict:
    """Bias and variance against T on tabular policies (the analogue of the paper's Fig. 2), on-policy, each number
    averaged over one random (pi_ref, pi) pair per seed. Beside each key's means (one per T), `<key>_std` holds the
    standard deviation across seeds (ddof 1; None for one seed) and `<key>_seeds` the per-seed values.

    Means here come from the chain-rule route of `exact.moments`, which the main tables check against
    toy.expected_gradient (`mean_check`), because it is several times faster."""
    import statistics

    keys = ("rel_err", "bias_norm", "cos_rev", "var_single", "var_group")
    out: dict = {"vocab": vocab, "lengths": lengths, "seeds": seeds, "kl_pi_ref": [], "rev_norm": [],
                 "configs": {c.name: {f"{k}{s}": [] for k in keys for s in ("", "_std", "_seeds")} for c in configs}}
    for T in lengths:
        pgT = _as_pg(pg, T)
        acc: dict = {c.name: {k: [] for k in keys} for c in configs}
        kls, norms = [], []
        for seed in seeds:
            tr = tabular_triple(vocab, T, distance, 0.0, seed, eos=vocab - 1 if eos else None)
            rev = ex.targets(tr.policy, tr.ref, sampling=sampling)["rev"]
            en = ex.enumerate_groups(tr.policy, tr.ref, G, sampling=sampling)
            en1 = ex.enumerate_groups(tr.policy, tr.ref, 1, sampling=sampling)
            kls.append(seq_kl(tr.policy, tr.ref, sampling))
            norms.append(float(rev.norm()))
            for c in configs:
                beta = c.spec.beta or 1.0
                mean, var_g = ex.moments(en, ex.loss_coefficients(en, c.spec, pgT))
                mean = mean / beta
                cmp, row = ex.compare(mean, rev), acc[c.name]
                row["rel_err"].append(cmp["rel_err"])
                row["cos_rev"].append(cmp["cos"])
                row["bias_norm"].append(float((mean - rev).norm()))
                row["var_group"].append(var_g / beta**2)
                if not _needs_groups(c):
                    row["var_single"].append(ex.moments(en1, ex.loss_coefficients(en1, c.spec, _single(pgT)))[1]
                                             / beta**2)
        out["kl_pi_ref"].append(sum(kls) / len(kls))
        out["rev_norm"].append(sum(norms) / len(norms))
        for name, row in acc.items():
            summary = out["configs"][name]
            for k in keys:
                vals = [v for v in row[k] if v is not None]
                summary[k].append(sum(vals) / len(vals) if vals else None)
                summary[f"{k}_std"].append(statistics.stdev(vals) if len(vals) > 1 else None)
                summary[f"{k}_seeds"].append(list(row[k]) or [None] * len(seeds))
    return out
