"""Exact bias and variance of each configuration's gradient estimator, by enumeration.

The estimator of one configuration is g(Y) = grad_theta L(Y), L = the trainer's loss (`policy_loss`) on a group
Y = (y_1..y_G) of i.i.d. responses. Its mean E[g] comes from `klrl.core.toy.expected_gradient`. Its variance,
tr Cov[g] = E||g||^2 - ||E g||^2, needs every group's own gradient, obtained by the chain rule without one backward
pass per group: L depends on theta only through the log-probs l_{it} = log pi(y_it | s_it), so

    g(Y) = sum_{i,t} c_{it}(Y) J_{y_i, t},     c = dL/dl (one autograd pass over all groups),
                                                J_{y,t} = grad_theta log pi(y_t | y_<t) (one batched pass),
    ||g(Y)||^2 = c(Y)^T K c(Y),                K = J J^T (the Gram matrix of the per-token score vectors).

Nothing here restates the theory's formulas: the estimator is the real loss, the targets are exact divergences.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from klrl.core.distributions import Sampling
from klrl.core.losses import KLSpec, PGSpec, policy_loss
from klrl.core.toy import context_targets, exact_targets, group_token_norm, groups, log_probs, responses, scored


@dataclass
class Enumeration:
    """Every group of G responses that `behaviour` can sample, with its probability, and the score Jacobian."""

    seqs: Tensor  # [N, T]
    mask: Tensor  # [N, T]
    idx: Tensor  # [N**G, G] sequence indices of each group
    weight: Tensor  # [N**G] probability of each group under the behaviour policy
    logp: Tensor  # [N, T] log pi(y_t|s_t), detached
    old: Tensor  # [N, T] behaviour log-probs
    ref: Tensor  # [N, T] reference log-probs
    jac: Tensor  # [N*T, P] J: grad_theta of each log-prob
    gram: Tensor  # [N*T, N*T] J J^T


class _LogProbs(nn.Module):
    """The trainer's log-probs of `seqs` under the policy as a module call, so that torch.func can swap
    policy.theta for a functional tensor."""

    def __init__(self, policy: nn.Module, mask: Tensor, sampling: Sampling):
        super().__init__()
        self.policy, self.mask, self.sampling = policy, mask, sampling

    def forward(self, seqs: Tensor) -> Tensor:
        return log_probs(self.policy, seqs, self.mask, self.sampling)


def score_jacobian(policy: nn.Module, seqs: Tensor, mask: Tensor, sampling: Sampling = Sampling()) -> Tensor:
    """[N*T, P]: row (n, t) is grad_theta log pi(y_nt | y_n,<t) (0 at padding), in toy.flat_grad's order."""
    wrapper = _LogProbs(policy, mask, sampling)
    fn = torch.func.jacrev(lambda th: functional_call(wrapper, {"policy.theta": th}, (seqs,)), chunk_size=512)
    with warnings.catch_warnings():  # sdpa's backward has no vmap rule yet; the fallback loop is exact, only slower
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return fn(policy.theta.detach()).reshape(seqs.numel(), -1)


def enumerate_groups(policy: nn.Module, ref: nn.Module, group_size: int, behaviour: nn.Module | None = None,
                     sampling: Sampling = Sampling()) -> Enumeration:
    behaviour = behaviour if behaviour is not None else policy
    r = responses(behaviour, sampling)
    idx = groups(len(r.seqs), group_size)
    jac = score_jacobian(policy, r.seqs, r.mask, sampling)
    logp, ref_lp = scored(policy, ref, r.seqs, r.mask, sampling)
    weight = r.prob[idx].prod(-1)
    return Enumeration(r.seqs, r.mask, idx, weight, logp.detach(), r.old, ref_lp, jac, jac @ jac.T)


def loss_coefficients(en: Enumeration, kl: KLSpec, pg: PGSpec, rewards: Tensor | None = None) -> Tensor:
    """c = dL(Y)/dl for every group Y, [N**G, G, T], from one pass of the real `policy_loss` over all groups.

    Groups are independent in the loss (the baseline and the leave-one-out terms are per group, and each group is
    one batch of the trainer), so the gradient of the sum of group losses with respect to a group's log-probs is
    that group's own gradient."""
    flat = en.idx.reshape(-1)
    G = en.idx.shape[1]
    logp = en.logp[flat].clone().requires_grad_(True)
    r = torch.zeros(len(en.seqs), dtype=logp.dtype) if rewards is None else rewards.to(logp.dtype)
    mask = en.mask[flat]
    out = policy_loss(logp, en.old[flat], en.ref[flat], mask, r[flat], G, pg, kl, token_norm=group_token_norm(mask, G))
    (c,) = torch.autograd.grad(out.per_seq.view(-1, G).mean(-1).sum(), logp)
    return c.view(-1, G, logp.shape[-1])


def moments(en: Enumeration, c: Tensor, chunk: int = 1 << 22) -> tuple[Tensor, float]:
    """(E[g], tr Cov[g]) of the estimator whose per-group loss coefficients are c."""
    T = en.logp.shape[1]
    pos = (en.idx[:, :, None] * T + torch.arange(T)).reshape(len(en.idx), -1)  # [groups, G*T] rows of J
    cw = c.reshape(len(en.idx), -1)
    weighted = (en.weight[:, None] * cw).reshape(-1)
    mean_rows = torch.zeros(en.jac.shape[0], dtype=c.dtype).index_add_(0, pos.reshape(-1), weighted)
    mean = en.jac.T @ mean_rows
    step = max(1, chunk // cw.shape[1] ** 2)
    second = torch.zeros((), dtype=c.dtype)
    for s in range(0, len(cw), step):
        p, v = pos[s : s + step], cw[s : s + step]
        k = en.gram[p[:, :, None], p[:, None, :]]
        second += (en.weight[s : s + step] * torch.einsum("ga,gab,gb->g", v, k, v)).sum()
    return mean, float((second - mean @ mean).clamp(min=0))


def targets(policy: nn.Module, ref: nn.Module, old: nn.Module | None = None, sampling: Sampling = Sampling()
            ) -> dict[str, Tensor]:
    """The named directions verdicts are expressed in. rev = grad KL(pi||pi_ref) (the objective), fwd =
    grad KL(pi_ref||pi) (sequence level), Fctx / Rtok as in `klrl.core.toy.context_targets`; with `old`, also Fctx@old
    and Rtok@old, their versions over pi_old's contexts (what token-weighted losses follow off-policy)."""
    t = exact_targets(policy, ref, sampling)
    out = {"rev": t["reverse_kl"], "fwd": t["forward_kl"], "Fctx": t["context_forward"], "Rtok": t["token_reverse"]}
    if old is not None:
        out.update({f"{k}@old": v for k, v in context_targets(policy, ref, old, sampling).items()})
    return {k: v.detach() for k, v in out.items()}


ROUND_OFF = 1e-9  # |E g| below this fraction of |grad KL| is zero: float64 round-off of an enumeration


def compare(g: Tensor, target: Tensor) -> dict[str, float | None]:
    """rel_err = ||g - t|| / ||t||; cos = <g, t> / (||g|| ||t||), None when g is zero up to round-off (its
    direction is noise)."""
    nt, ng = target.norm(), g.norm()
    cos = float(g @ target / (ng * nt)) if ng > ROUND_OFF * nt and nt > 0 else None
    return {"rel_err": float((g - target).norm() / nt), "cos": cos}


def decompose(g: Tensor, basis: dict[str, Tensor], tol: float = 1e-6, max_terms: int = 3) -> dict[str, float] | None:
    """The sparsest combination of named targets that equals g to relative precision tol: {} for g = 0,
    {"rev": 1.0} for an unbiased estimator, None if no combination of <= max_terms targets fits."""
    scale = max(float(v.norm()) for v in basis.values())
    if g.norm() <= tol * scale:
        return {}
    names = list(basis)
    for k in range(1, min(max_terms, g.numel() - 1) + 1):  # k >= P terms would fit any g and say nothing
        best = None
        for subset in itertools.combinations(names, k):
            a = torch.stack([basis[n] for n in subset], 1)
            coef = torch.linalg.lstsq(a, g[:, None]).solution[:, 0]
            resid = float((a @ coef - g).norm() / g.norm())
            if resid < tol and (best is None or resid < best[0]):
                best = (resid, {n: round(float(x), 6) for n, x in zip(subset, coef)})
        if best is not None:
            return best[1]
    return None
