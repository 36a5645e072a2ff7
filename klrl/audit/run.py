"""The exact audit: every selected configuration on one enumerable policy, on- and off-policy, and against T.

Conventions: beta = 1 and task rewards 0, so the estimator's expectation is the KL contribution itself and is
compared with grad KL(pi||pi_ref) directly. The single-sample estimator is G = 1 without a baseline (plain
REINFORCE); the batch estimator is a group of G with the chosen baseline, exactly as `policy_loss` forms it.
"""

from __future__ import annotations

import torch

from klrl.audit import exact as ex
from klrl.audit.configs import AuditConfig
from klrl.audit.policies import TRIPLES, Triple, tabular_triple
from klrl.losses import PGSpec
from klrl.toy import expected_gradient


def seq_kl(p, q) -> float:
    """Exact sequence-level KL(p || q) by enumeration."""
    with torch.no_grad():
        seqs = p.all_sequences()
        lp, lq = p.log_probs(seqs).sum(-1), q.log_probs(seqs).sum(-1)
        return float((lp.exp() * (lp - lq)).sum())


def _needs_groups(c: AuditConfig) -> bool:
    return c.reward_is_weight  # the leave-one-out inside the sequence-weighted penalty needs G >= 2


def audit_regime(tr: Triple, configs: list[AuditConfig], G: int, baseline: str, off_policy: bool) -> dict:
    """One table: every configuration's exact mean, bias, decomposition, verdict and variances."""
    behaviour = tr.old if off_policy else None
    basis = ex.targets(tr.policy, tr.ref, tr.old if off_policy else None)
    pg, pg1 = PGSpec(baseline=baseline), PGSpec(baseline="none")
    en = ex.enumerate_groups(tr.policy, tr.ref, G, behaviour)
    en1 = ex.enumerate_groups(tr.policy, tr.ref, 1, behaviour)
    rows = {}
    for c in configs:
        mean = expected_gradient(tr.policy, tr.ref, c.spec, pg, G, behaviour=behaviour).detach()
        mean_cj, var_g = ex.moments(en, ex.loss_coefficients(en, c.spec, pg))
        var_1 = None if _needs_groups(c) else ex.moments(en1, ex.loss_coefficients(en1, c.spec, pg1))[1]
        parts = ex.decompose(mean, basis)
        rows[c.name] = {
            "estimator": c.estimator, "placement": c.placement, "reward_form": c.reward_form,
            "reward_is_weight": c.reward_is_weight, "loss_is_weight": c.loss_is_weight, "overrides": c.overrides,
            "grad_norm": float(mean.norm()),
            "vs_rev": ex.compare(mean, basis["rev"]), "vs_fwd": ex.compare(mean, basis["fwd"]),
            "decomposition": parts, "verdict": ex.verdict(parts), "unbiased": parts == {"rev": 1.0},
            "var_single": var_1, "var_group": var_g,
            # The variance route (chain rule through c and J) must reproduce toy.expected_gradient's mean.
            "mean_check": float((mean_cj - mean).norm() / max(float(basis["rev"].norm()), 1e-300)),
        }
    return {
        "kl_pi_ref": seq_kl(tr.policy, tr.ref), "kl_old_pi": seq_kl(tr.old, tr.policy) if off_policy else 0.0,
        "target_norms": {k: float(v.norm()) for k, v in basis.items()}, "configs": rows,
    }


def audit_policy(kind: str, vocab: int, length: int, G: int, baseline: str, distance: float, off_distance: float,
                 seed: int, configs: list[AuditConfig]) -> dict:
    tr = TRIPLES[kind](vocab, length, distance, off_distance, seed)
    return {
        "n_params": tr.policy.theta.numel(),
        "on_policy": audit_regime(tr, configs, G, baseline, off_policy=False),
        "off_policy": audit_regime(tr, configs, G, baseline, off_policy=True),
    }


def length_sweep(vocab: int, lengths: list[int], G: int, baseline: str, distance: float, seeds: list[int],
                 configs: list[AuditConfig]) -> dict:
    """Bias and variance against T on tabular policies (the analogue of the paper's Fig. 2), on-policy, each number
    averaged over one random (pi_ref, pi) pair per seed.

    Means here come from the chain-rule route of `exact.moments`, which the main tables check against
    toy.expected_gradient (`mean_check`), because it is several times faster."""
    pg, pg1 = PGSpec(baseline=baseline), PGSpec(baseline="none")
    keys = ("rel_err", "bias_norm", "cos_rev", "var_single", "var_group")
    out: dict = {"vocab": vocab, "lengths": lengths, "seeds": seeds, "kl_pi_ref": [], "rev_norm": [],
                 "configs": {c.name: {k: [] for k in keys} for c in configs}}
    for T in lengths:
        acc: dict = {c.name: {k: [] for k in keys} for c in configs}
        kls, norms = [], []
        for seed in seeds:
            tr = tabular_triple(vocab, T, distance, 0.0, seed)
            rev = ex.targets(tr.policy, tr.ref)["rev"]
            en, en1 = ex.enumerate_groups(tr.policy, tr.ref, G), ex.enumerate_groups(tr.policy, tr.ref, 1)
            kls.append(seq_kl(tr.policy, tr.ref))
            norms.append(float(rev.norm()))
            for c in configs:
                mean, var_g = ex.moments(en, ex.loss_coefficients(en, c.spec, pg))
                cmp, row = ex.compare(mean, rev), acc[c.name]
                row["rel_err"].append(cmp["rel_err"])
                row["cos_rev"].append(cmp["cos"])
                row["bias_norm"].append(float((mean - rev).norm()))
                row["var_group"].append(var_g)
                if not _needs_groups(c):
                    row["var_single"].append(ex.moments(en1, ex.loss_coefficients(en1, c.spec, pg1))[1])
        out["kl_pi_ref"].append(sum(kls) / len(kls))
        out["rev_norm"].append(sum(norms) / len(norms))
        for name, row in acc.items():
            for k in keys:
                out["configs"][name][k].append(sum(row[k]) / len(row[k]) if row[k] else None)
    return out
