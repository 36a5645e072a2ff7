"""The distribution the sampler draws from, as logits: the one klrl trains, logs and audits.

With `generation.temperature=T` and `generation.top_p=p`, transformers' `generate` samples each token from
softmax(z / T) cut to the nucleus (the smallest set of most likely tokens whose probability reaches p) and
renormalised. Every log-prob klrl computes (the policy's, the behaviour policy's, the reference's), every KL
estimate, the exact KL, the entropy and the importance ratios are those of that distribution, so that what is
optimised is what is sampled. Pure functions: tensors in, tensors out.

The reference. KL is measured against the reference model sampled the same way, pi_ref^T = softmax(z_ref / T),
renormalised onto the support of the policy's nucleus at that context:
- at p = 1 this is just pi_ref^T, and KL = 0 when pi = pi_ref;
- at p < 1, restricting pi_ref to its *own* nucleus would make the KL infinite whenever the policy samples a token
  outside it, and the uncut pi_ref^T would put mass where the policy cannot sample, so that k3 (whose value is
  unbiased only when E_pi[pi_ref/pi] = 1) stops estimating the same KL as k1. On the policy's support both are
  unbiased, and KL = 0 when pi = pi_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16 / fp16 logits are scored in float32); float64 stays float64 (the exact toys)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def nucleus(scaled: Tensor, top_p: float, keep: Tensor | None = None) -> Tensor:
    """Bool mask [..., V] of the nucleus of softmax(scaled), by transformers' TopPLogitsWarper's rule: sort
    ascending, drop the tokens whose cumulative probability is <= 1 - top_p, keep at least the most likely one.

    keep: [...] token ids always kept in the set (the token that was sampled), so that a boundary token which
    a different kernel's round-off put on the other side never gets probability 0 here."""
    V = scaled.shape[-1]
    flat = upcast(scaled.reshape(-1, V))
    sorted_logits, order = torch.sort(flat, descending=False)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    support = ~drop.reshape(scaled.shape)
    if keep is not None:
        support = support.scatter(-1, keep[..., None].to(support.device), True)
    return support


def sampling_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, keep: Tensor | None = None,
                    support: Tensor | None = None) -> Tensor:
    """Logits [..., V] of the sampler's distribution: logits / T (at least float32), -inf outside `support`.

    support: a bool mask [..., V] to cut to (a reference is cut to its policy's support); default, when top_p < 1,
    this distribution's own nucleus (plus `keep`). With T = 1, p = 1 and no support this is logits.float()."""
    scaled = upcast(logits)
    if temperature != 1.0:
        scaled = scaled / temperature
    if support is None and top_p < 1.0:
        support = nucleus(scaled.detach(), top_p, keep)
    if support is not None:
        scaled = scaled.masked_fill(~support, float("-inf"))
    return scaled


def token_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """log softmax(logits)[token] in float32, [B, T, V] x [B, T] -> [B, T]; exactly 0 at padding (mask 0), whatever
    the logits there hold (padding rows may be non-finite). `logits` are the sampler's (`sampling_logits`)."""
    logits = upcast(logits)
    lp = logits.gather(-1, tokens[..., None].to(logits.device)).squeeze(-1) - torch.logsumexp(logits, -1)
    return torch.where(mask.to(lp.device) > 0, lp, torch.zeros_like(lp))


def exact_kl_entropy(logits: Tensor, ref_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-position KL(q || r) and entropy H(q), [..., V] -> ([...], [...]), where q and r are the
    distributions of two sampler logits (`sampling_logits`; -inf marks tokens outside the support, which must
    include q's). Used for logging: the common yardstick across estimators."""
    logq = torch.log_softmax(upcast(logits), -1)
    logr = torch.log_softmax(upcast(ref_logits), -1)
    inside = torch.isfinite(logq)
    logq, logr = logq.masked_fill(~inside, 0), logr.masked_fill(~inside, 0)  # no -inf * 0 outside the support
    q = torch.where(inside, logq.exp(), torch.zeros_like(logq))
    return (q * (logq - logr)).sum(-1), -(q * logq).sum(-1)


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled: generation.temperature and generation.top_p (or eval.*)."""

    temperature: float = 1.0
    top_p: float = 1.0
