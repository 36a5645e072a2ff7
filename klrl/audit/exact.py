"""Exact bias and variance of each configuration's gradient estimator, by enumeration.

The estimator of one configuration is g(Y) = grad_theta L(Y), L = the trainer's loss (`policy_loss`) on a group
Y = (y_1..y_G) of i.i.d. responses. Its mean E[g] comes from `klrl.toy.expected_gradient`. Its variance,
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

from klrl.losses import KLSpec, PGSpec, policy_loss
from klrl.toy import exact_targets, groups


@dataclass
class Enumeration:
    """Every group of G responses that `behaviour` can sample, with its probability, and the score Jacobian."""

    seqs: Tensor  # [N, T]
    idx: Tensor  # [N**G, G] sequence indices of each group
    weight: Tensor  # [N**G] probability of each group under the behaviour policy
    logp: Tensor  # [N, T] log pi(y_t|s_t), detached
    old: Tensor  # [N, T] behaviour log-probs
    ref: Tensor  # [N, T] reference log-probs
    jac: Tensor  # [N*T, P] J: grad_theta of each log-prob
    gram: Tensor  # [N*T, N*T] J J^T


class _LogProbs(nn.Module):
    """policy.log_probs as a module call, so that torch.func can swap policy.theta for a functional tensor."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, seqs: Tensor) -> Tensor:
        return self.policy.log_probs(seqs)


def score_jacobian(policy: nn.Module, seqs: Tensor) -> Tensor:
    """[N*T, P]: row (n, t) is grad_theta log pi(y_nt | y_n,<t), in toy.flat_grad's parameter order."""
    wrapper = _LogProbs(policy)
    fn = torch.func.jacrev(lambda th: functional_call(wrapper, {"policy.theta": th}, (seqs,)), chunk_size=512)
    with warnings.catch_warnings():  # sdpa's backward has no vmap rule yet; the fallback loop is exact, only slower
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return fn(policy.theta.detach()).reshape(seqs.numel(), -1)


def enumerate_groups(policy: nn.Module, ref: nn.Module, group_size: int, behaviour: nn.Module | None = None
                     ) -> Enumeration:
    behaviour = behaviour if behaviour is not None else policy
    seqs = policy.all_sequences()
    idx = groups(len(seqs), group_size)
    jac = score_jacobian(policy, seqs)
    with torch.no_grad():
        old = behaviour.log_probs(seqs)
        weight = old.sum(-1)[idx].sum(-1).exp()
        return Enumeration(seqs, idx, weight, policy.log_probs(seqs), old, ref.log_probs(seqs), jac, jac @ jac.T)


def loss_coefficients(en: Enumeration, kl: KLSpec, pg: PGSpec, rewards: Tensor | None = None) -> Tensor:
    """c = dL(Y)/dl for every group Y, [N**G, G, T], from one pass of the real `policy_loss` over all groups.

    Groups are independent in the loss (the baseline and the leave-one-out terms are per group), so the gradient
    of the sum of group losses with respect to a group's log-probs is that group's own gradient."""
    flat = en.idx.reshape(-1)
    G = en.idx.shape[1]
    logp = en.logp[flat].clone().requires_grad_(True)
    r = torch.zeros(len(en.seqs), dtype=logp.dtype) if rewards is None else rewards.to(logp.dtype)
    out = policy_loss(logp, en.old[flat], en.ref[flat], torch.ones_like(logp), r[flat], G, pg, kl)
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


def context_targets(policy: nn.Module, ref: nn.Module, contexts: nn.Module) -> dict[str, Tensor]:
    """Per-context gradients with the context distribution of `contexts` (held fixed), w.r.t. policy.theta:

    Fctx: sum_s P(s) grad KL(pi_ref(.|s) || pi(.|s))   (what k3 in the loss follows)
    Rtok: sum_s P(s) grad KL(pi(.|s) || pi_ref(.|s))   (the token-level "partial" reverse-KL gradient)
    With contexts = policy these are toy.exact_targets' context_forward and token_reverse."""
    seqs = policy.all_sequences()
    V, T = policy.vocab, policy.length
    with torch.no_grad():
        lc = contexts.log_probs(seqs)
        prefix = torch.cat([torch.zeros_like(lc[:, :1]), lc[:, :-1].cumsum(-1)], -1).exp()
        # Each context is the prefix of V**(T-t) enumerated sequences: divide so that it counts once.
        weight = prefix / torch.tensor([float(V ** (T - t)) for t in range(T)], dtype=lc.dtype)
        logr = torch.log_softmax(ref.logits(seqs), -1)
    logq = torch.log_softmax(policy.logits(seqs), -1)
    fwd = (logr.exp() * (logr - logq)).sum(-1)
    rev = (logq.exp() * (logq - logr)).sum(-1)
    (f,) = torch.autograd.grad((weight * fwd).sum(), [policy.theta], retain_graph=True)
    (r,) = torch.autograd.grad((weight * rev).sum(), [policy.theta])
    return {"Fctx": f.reshape(-1), "Rtok": r.reshape(-1)}


def targets(policy: nn.Module, ref: nn.Module, old: nn.Module | None = None) -> dict[str, Tensor]:
    """The named directions verdicts are expressed in. rev = grad KL(pi||pi_ref) (the objective), fwd =
    grad KL(pi_ref||pi) (sequence level), Fctx / Rtok as in `context_targets`; with `old`, also Fctx@old and
    Rtok@old, their versions over pi_old's contexts (what token-weighted losses follow off-policy)."""
    t = exact_targets(policy, ref)
    out = {"rev": t["reverse_kl"], "fwd": t["forward_kl"], "Fctx": t["context_forward"], "Rtok": t["token_reverse"]}
    if old is not None:
        out.update({f"{k}@old": v for k, v in context_targets(policy, ref, old).items()})
    return {k: v.detach() for k, v in out.items()}


def compare(g: Tensor, target: Tensor) -> dict[str, float]:
    """rel_err = ||g - t|| / ||t||; cos = <g, t> / (||g|| ||t||), 0 for a zero g."""
    nt, ng = target.norm(), g.norm()
    cos = float(g @ target / (ng * nt)) if ng > 0 and nt > 0 else 0.0
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


def verdict(parts: dict[str, float] | None) -> str:
    """Plain words for a decomposition."""
    if parts is None:
        return "biased (no simple form)"
    if not parts:
        return "zero in expectation"
    if set(parts) == {"rev"}:
        c = parts["rev"]
        return "unbiased" if abs(c - 1) < 1e-6 else f"biased: {c:.3g} x rev (scaled)"
    return "biased: " + formula(parts)


def formula(parts: dict[str, float]) -> str:
    out = ""
    for n, c in parts.items():
        sign = "-" if c < 0 else "+"
        mag = "" if abs(abs(c) - 1) < 1e-6 else f"{abs(c):.3g}*"
        out += f" {sign} {mag}{n}" if out else f"{'-' if c < 0 else ''}{mag}{n}"
    return out
