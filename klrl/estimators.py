"""Per-token KL estimators: a registry of pure functions of the log-ratio.

Every estimator takes delta_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t) for the sampled tokens and returns the
per-token estimate k_t. Summed over a response, sum_t k_t estimates the sequence-level reverse KL(pi || pi_ref).
What gradient a configuration produces depends on the estimator *and* on where it is placed
(see ``klrl.losses``); the docstrings give the verdict for each placement, on-policy (y ~ pi).

Adding an estimator: one function here, one YAML in conf/estimator/, one row in tests/test_exact_gradients.py.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Estimator = Callable[[Tensor], Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


@register("k1")
def k1(delta: Tensor) -> Tensor:
    """k1 = log(pi/pi_ref) = delta.

    Value: unbiased for KL(pi||pi_ref) (sequence sum).
    In reward (detached): score-function term E[(sum_t k1) grad log pi(y)] = grad KL(pi||pi_ref): unbiased.
    In loss (differentiated): E[sum_t grad log pi(y_t|s_t)] = 0: zero in expectation, pure noise.
    """
    return delta


@register("k2")
def k2(delta: Tensor) -> Tensor:
    """k2 = 0.5 * delta^2.

    Value: biased (agrees with KL to second order near pi = pi_ref).
    In loss: grad k2 = delta * grad log pi(y_t|s_t), whose expectation is the token-level partial gradient
    sum_t E[grad KL(pi(.|s_t)||pi_ref(.|s_t)) with s_t held fixed]: it drops the future-token terms, so it is biased
    for the sequence objective (Tang & Munos' second pitfall).
    In reward: score-function term of a biased value: biased.
    """
    return 0.5 * delta * delta


@register("k3")
def k3(delta: Tensor) -> Tensor:
    """k3 = pi_ref/pi - 1 - log(pi_ref/pi) = exp(-delta) - 1 + delta  (>= 0; Schulman's "low variance" estimator).

    Value: unbiased for KL(pi||pi_ref).
    In loss: grad k3 = (1 - pi_ref/pi) grad log pi, whose expectation is sum_t E[grad KL(pi_ref(.|s_t)||pi(.|s_t))]:
    a per-context *forward* KL gradient (GRPO / verl low_var_kl). Biased.
    In reward: grad KL(pi||pi_ref) minus the in-loss term above. Biased (the paper's collapsing configuration).
    In reward and loss together: the two terms add up to grad KL(pi||pi_ref): unbiased.
    """
    return torch.expm1(-delta) + delta


def log_ratio(logp: Tensor, ref_logp: Tensor, clamp: float | None = None) -> Tensor:
    """delta = logp - ref_logp, optionally clamped to [-clamp, clamp].

    Clamping zeroes the gradient of tokens whose |delta| exceeds the clamp, which changes the gradient; it is off by
    default because frameworks disagree on it (verl +-20, OAT +-40, TRL none), a confound between estimators.
    """
    delta = logp - ref_logp
    return delta if clamp is None else delta.clamp(-clamp, clamp)


def sequence_estimates(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sequence-level value of every registered estimator: {name: [B] tensor of sum_t k_t}, no gradient."""
    with torch.no_grad():
        delta = (logp - ref_logp) * mask
        return {name: (fn(delta) * mask).sum(-1) for name, fn in ESTIMATORS.items()}


def exact_token_kl(logits: Tensor, ref_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-position reverse KL(pi(.|s_t)||pi_ref(.|s_t)) and entropy H(pi(.|s_t)) from full next-token logits.

    Shapes: [..., V] -> ([...], [...]). Used only for logging: it is the common yardstick across estimators.
    """
    logq = torch.log_softmax(logits.float(), -1)
    logr = torch.log_softmax(ref_logits.float(), -1)
    q = logq.exp()
    return (q * (logq - logr)).sum(-1), -(q * logq).sum(-1)
