"""An autoregressive policy small enough to enumerate, and the exact quantities theory talks about.

Used by the exact-gradient tests and by `klrl audit`. Expected gradients are computed by running the real
`klrl.core.losses.policy_loss` on every possible group of G sampled responses, weighted by its probability, with
log-probs from the trainer's own `klrl.core.distributions` (temperature, top-p, the reference cut to the policy's
support): no formula from the theory is re-derived here, only the exact divergences the theory makes claims about.

Responses have variable length: with an end-of-sequence token, a response stops at its first EOS (kept, as the
trainer keeps it) and the positions after it are padding (mask 0), so length effects of the aggregation show.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from klrl.core.distributions import Sampling, sampling_logits, token_logprobs
from klrl.core.losses import KLSpec, PGSpec, policy_loss


def enumerate_sequences(vocab: int, length: int, eos: int | None = None) -> tuple[Tensor, Tensor]:
    """Every response of at most `length` tokens: ([N, length] ids, [N, length] float mask). With `eos`, a response
    ends at its first EOS (included); the positions after it hold `eos` and mask 0."""
    seqs, masks = [], []
    for full in itertools.product(range(vocab), repeat=length):
        n = full.index(eos) + 1 if eos is not None and eos in full else length
        seq = full[:n] + (eos,) * (length - n) if n < length else full
        if seq == full:  # each response once: its canonical padded form
            seqs.append(seq)
            masks.append([1.0] * n + [0.0] * (length - n))
    return torch.tensor(seqs), torch.tensor(masks, dtype=torch.float64)


class TabularPolicy(nn.Module):
    """pi(y_t | y_<t) = softmax(theta[prefix(y_<t)]): one free logit vector per prefix, V tokens, length T."""

    def __init__(self, vocab: int, length: int, scale: float = 1.0, seed: int = 0, eos: int | None = None):
        super().__init__()
        self.vocab, self.length, self.eos = vocab, length, eos
        offsets = [0]
        for t in range(length - 1):
            offsets.append(offsets[-1] + vocab**t)
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        gen = torch.Generator().manual_seed(seed)
        n_prefix = sum(vocab**t for t in range(length))
        self.theta = nn.Parameter(torch.randn(n_prefix, vocab, generator=gen, dtype=torch.float64) * scale)

    def prefix_index(self, seqs: Tensor) -> Tensor:
        """[B, T] token ids -> [B, T] row of theta used at each position."""
        code = torch.zeros(seqs.shape[0], dtype=torch.long)
        rows = []
        for t in range(self.length):
            rows.append(self.offsets[t] + code)
            code = code * self.vocab + seqs[:, t]
        return torch.stack(rows, -1)

    def logits(self, seqs: Tensor) -> Tensor:
        """[B, T] -> [B, T, V] raw next-token logits at each position."""
        return self.theta[self.prefix_index(seqs)]

    def all_sequences(self) -> tuple[Tensor, Tensor]:
        return enumerate_sequences(self.vocab, self.length, self.eos)


def dist_logits(policy: nn.Module, seqs: Tensor, sampling: Sampling = Sampling(), support: Tensor | None = None,
                keep: bool = True) -> Tensor:
    """[N, T, V] logits of the distribution `policy` samples from (the trainer's `sampling_logits`). keep: the
    token at each position stays in the nucleus, as when the trainer scores a sampled response."""
    return sampling_logits(policy.logits(seqs), sampling.temperature, sampling.top_p,
                           keep=seqs if keep and sampling.top_p < 1 else None, support=support)


def support(logits: Tensor, sampling: Sampling) -> Tensor | None:
    return None if sampling.top_p >= 1 else torch.isfinite(logits.detach())


def log_probs(policy: nn.Module, seqs: Tensor, mask: Tensor, sampling: Sampling = Sampling(),
              support: Tensor | None = None, keep: bool = True) -> Tensor:
    """[N, T] log-probs of the tokens under the sampling distribution, 0 at padding."""
    return token_logprobs(dist_logits(policy, seqs, sampling, support, keep), seqs, mask)


def flat_grad(value: Tensor, policy: nn.Module) -> Tensor:
    (g,) = torch.autograd.grad(value, [policy.theta], retain_graph=True)
    return g.reshape(-1)


class Responses(NamedTuple):
    """The responses a behaviour policy can sample (probability > 0), with what the trainer would compute."""

    seqs: Tensor  # [N, T]
    mask: Tensor  # [N, T]
    prob: Tensor  # [N] probability under the behaviour policy
    old: Tensor  # [N, T] behaviour log-probs (detached)


def responses(behaviour: nn.Module, sampling: Sampling = Sampling()) -> Responses:
    seqs, mask = behaviour.all_sequences()
    with torch.no_grad():
        prob = log_probs(behaviour, seqs, mask, sampling, keep=False).sum(-1).exp()
        live = prob > 0  # a nucleus cut leaves responses the sampler can never draw
        seqs, mask, prob = seqs[live], mask[live], prob[live]
        return Responses(seqs, mask, prob, log_probs(behaviour, seqs, mask, sampling))


def scored(policy: nn.Module, ref: nn.Module, seqs: Tensor, mask: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """(policy log-probs with grad, reference log-probs) of sampled responses, exactly as the trainer scores them:
    the reference is cut to the policy's support."""
    logits = dist_logits(policy, seqs, sampling)
    logp = token_logprobs(logits, seqs, mask)
    with torch.no_grad():
        ref_lp = log_probs(ref, seqs, mask, sampling, support=support(logits, sampling))
    return logp, ref_lp


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last axis, 0 where p = 0 (cut tokens hold -inf)."""
    inside = torch.isfinite(logp)
    # Fill before computing, not after: a NaN in where()'s unused branch would still poison the backward pass.
    lp, lq = logp.masked_fill(~inside, 0), logq.masked_fill(~inside, 0)
    return torch.where(inside, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def context_targets(policy: nn.Module, ref: nn.Module, contexts: nn.Module, sampling: Sampling = Sampling()
                    ) -> dict[str, Tensor]:
    """Per-context gradients, w.r.t. policy.theta, with the contexts visited by `contexts` (weights held fixed):

    Fctx: sum_s P(s) grad KL(pi_ref(.|s) || pi(.|s))   (what k3 in the loss follows)
    Rtok: sum_s P(s) grad KL(pi(.|s) || pi_ref(.|s))   (the token-level "partial" reverse-KL gradient)

    sum_s P(s) f(s) = E_y[sum_t f(s_t(y))], so every (response, position) is weighted by P(y)."""
    r = responses(contexts, sampling)
    logq = torch.log_softmax(dist_logits(policy, r.seqs, sampling, keep=False), -1)
    with torch.no_grad():
        logr = torch.log_softmax(dist_logits(ref, r.seqs, sampling, support=support(logq, sampling)), -1)
    weight = (r.prob[:, None] * r.mask).detach()
    fwd, rev = _kl_rows(logr, logq), _kl_rows(logq, logr)
    return {"Fctx": flat_grad((weight * fwd).sum(), policy), "Rtok": flat_grad((weight * rev).sum(), policy)}


def exact_targets(policy: nn.Module, ref: nn.Module, sampling: Sampling = Sampling()) -> dict[str, Tensor]:
    """Exact gradients (w.r.t. policy.theta) of the divergences the theory compares against:

    reverse_kl:        grad KL(pi || pi_ref), sequence level: the objective's true gradient.
    forward_kl:        grad KL(pi_ref || pi), sequence level.
    context_forward:   Fctx of `context_targets` over pi's own contexts.
    token_reverse:     Rtok of `context_targets` (the token-level "partial" gradient).
    pi and pi_ref are the sampling distributions (tempered, pi_ref cut to pi's nucleus)."""
    seqs, mask = policy.all_sequences()
    logits = dist_logits(policy, seqs, sampling, keep=False)
    lp = token_logprobs(logits, seqs, mask).sum(-1)
    with torch.no_grad():
        lr = log_probs(ref, seqs, mask, sampling, support=support(logits, sampling), keep=False).sum(-1)
        live = torch.isfinite(lp)  # the reference lives on the policy's support, so only these have mass
    lp, lr = lp[live], lr[live]
    p, r = lp.exp(), lr.exp()
    ctx = context_targets(policy, ref, policy, sampling)
    return {
        "reverse_kl": flat_grad((p * (lp - lr)).sum(), policy),
        "forward_kl": flat_grad((r * (lr - lp)).sum(), policy),
        "context_forward": ctx["Fctx"],
        "token_reverse": ctx["Rtok"],
    }


def group_token_norm(mask: Tensor, group_size: int) -> Tensor:
    """[B] each row's token_mean normaliser when every group of G rows is one batch of the trainer: that batch's
    own token count per sequence (what the trainer's global count is for a batch of one prompt)."""
    per_group = mask.view(-1, group_size * mask.shape[-1]).sum(-1) / group_size
    return per_group.repeat_interleave(group_size).clamp(min=1e-9)


def groups(n_seq: int, group_size: int) -> Tensor:
    """Every ordered G-tuple of sequence indices: [n_seq**G, G]."""
    return torch.tensor(list(itertools.product(range(n_seq), repeat=group_size)))


def expected_gradient(
    policy: nn.Module,
    ref: nn.Module,
    kl: KLSpec,
    pg: PGSpec,
    group_size: int,
    behaviour: nn.Module | None = None,
    rewards: Tensor | None = None,
    sampling: Sampling = Sampling(),
) -> Tensor:
    """E[grad of policy_loss] over groups of G i.i.d. responses from `behaviour` (default: the policy itself), each
    group being one batch of the trainer (so token_mean divides by that batch's own token count).

    rewards: optional task reward per response of `behaviour.all_sequences()` (default 0, which isolates the KL
    contribution)."""
    behaviour = behaviour if behaviour is not None else policy
    r = responses(behaviour, sampling)
    idx = groups(len(r.seqs), group_size).reshape(-1)
    weight = r.prob[idx].view(-1, group_size).prod(-1)  # probability of each group
    seqs, mask = r.seqs[idx], r.mask[idx]
    logp, ref_lp = scored(policy, ref, seqs, mask, sampling)
    task = torch.zeros(len(r.seqs), dtype=logp.dtype) if rewards is None else _live_rewards(behaviour, rewards, sampling)
    out = policy_loss(logp, r.old[idx], ref_lp, mask, task[idx], group_size, pg, kl,
                      token_norm=group_token_norm(mask, group_size))
    group_loss = out.per_seq.view(-1, group_size).mean(-1)  # == the trainer's scalar loss for that group
    return flat_grad((weight * group_loss).sum(), policy)


def _live_rewards(behaviour: nn.Module, rewards: Tensor, sampling: Sampling) -> Tensor:
    """Task rewards given for every enumerated response, restricted to those the behaviour policy can sample."""
    seqs, mask = behaviour.all_sequences()
    with torch.no_grad():
        live = log_probs(behaviour, seqs, mask, sampling, keep=False).sum(-1).exp() > 0
    return rewards.to(torch.float64)[live]
