"""An autoregressive policy small enough to enumerate, and the exact quantities theory talks about.

Used by the exact-gradient tests and by ``klrl audit``. Expected gradients are computed by running the real
``klrl.losses.policy_loss`` on every possible group of G sampled sequences, weighted by its probability: no formula
from the theory is re-derived here, only the exact divergences the theory makes claims about.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from klrl.losses import KLSpec, PGSpec, policy_loss


class TabularPolicy(nn.Module):
    """pi(y_t | y_<t) = softmax(theta[prefix(y_<t)]): one free logit vector per prefix, V tokens, length T."""

    def __init__(self, vocab: int, length: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.vocab, self.length = vocab, length
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
        return self.theta[self.prefix_index(seqs)]

    def log_probs(self, seqs: Tensor) -> Tensor:
        """[B, T] log pi(y_t | y_<t)."""
        return torch.log_softmax(self.logits(seqs), -1).gather(-1, seqs[..., None]).squeeze(-1)

    def all_sequences(self) -> Tensor:
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))


def flat_grad(value: Tensor, policy: nn.Module) -> Tensor:
    (g,) = torch.autograd.grad(value, [policy.theta], retain_graph=True)
    return g.reshape(-1)


def exact_targets(policy: TabularPolicy, ref: TabularPolicy) -> dict[str, Tensor]:
    """Exact gradients (w.r.t. policy.theta) of the divergences the theory compares against.

    reverse_kl:        grad KL(pi || pi_ref), sequence level: the objective's true gradient.
    forward_kl:        grad KL(pi_ref || pi), sequence level.
    context_forward:   sum over contexts s visited by pi, weighted by P_pi(s) held fixed, of
                       grad KL(pi_ref(.|s) || pi(.|s)).
    token_reverse:     the same with grad KL(pi(.|s) || pi_ref(.|s)): the token-level "partial" gradient.
    """
    seqs = policy.all_sequences()
    lp, lr = policy.log_probs(seqs), ref.log_probs(seqs).detach()
    p_seq = lp.sum(-1).exp()
    r_seq = lr.sum(-1).exp()
    out = {
        "reverse_kl": flat_grad((p_seq * (lp.sum(-1) - lr.sum(-1))).sum(), policy),
        "forward_kl": flat_grad((r_seq * (lr.sum(-1) - lp.sum(-1))).sum(), policy),
    }
    # P_pi(s_t) for the context at each position of each sequence, held fixed; each context counted once by
    # weighting every full sequence with its probability and dividing by the number of completions it shares.
    logq = torch.log_softmax(policy.logits(seqs), -1)
    logr = torch.log_softmax(ref.logits(seqs), -1).detach()
    prefix_prob = torch.cat([torch.zeros_like(lp[:, :1]), lp[:, :-1].cumsum(-1)], -1).exp().detach()
    completions = torch.tensor([policy.vocab ** (policy.length - t) for t in range(policy.length)], dtype=lp.dtype)
    weight = prefix_prob / completions
    fwd = (logr.exp() * (logr - logq)).sum(-1)
    rev = (logq.exp() * (logq - logr)).sum(-1)
    out["context_forward"] = flat_grad((weight * fwd).sum(), policy)
    out["token_reverse"] = flat_grad((weight * rev).sum(), policy)
    return out


def groups(n_seq: int, group_size: int) -> Tensor:
    """Every ordered G-tuple of sequence indices: [n_seq**G, G]."""
    return torch.tensor(list(itertools.product(range(n_seq), repeat=group_size)))


def expected_gradient(
    policy: TabularPolicy,
    ref: TabularPolicy,
    kl: KLSpec,
    pg: PGSpec,
    group_size: int,
    behaviour: TabularPolicy | None = None,
    rewards: Tensor | None = None,
) -> Tensor:
    """E[grad of policy_loss] over groups of G i.i.d. sequences from `behaviour` (default: the policy itself).

    rewards: optional [n_seq] task reward per sequence (default 0, which isolates the KL contribution).
    """
    seqs = policy.all_sequences()
    behaviour = behaviour if behaviour is not None else policy
    idx = groups(len(seqs), group_size)
    batch = seqs[idx.reshape(-1)]
    with torch.no_grad():
        b_seq = behaviour.log_probs(seqs).sum(-1)
        old = behaviour.log_probs(batch)
        ref_lp = ref.log_probs(batch)
    weight = b_seq[idx].sum(-1).exp()  # probability of each group
    logp = policy.log_probs(batch)
    r = torch.zeros(len(seqs), dtype=logp.dtype) if rewards is None else rewards.to(logp.dtype)
    out = policy_loss(logp, old, ref_lp, torch.ones_like(logp), r[idx.reshape(-1)], group_size, pg, kl)
    group_loss = out.per_seq.view(-1, group_size).mean(-1)  # == the trainer's scalar loss for that group
    return flat_grad((weight * group_loss).sum(), policy)
