"""Per-token KL estimators: a registry of pure functions of the log-ratio.

Every estimator takes delta_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t) for the sampled tokens and returns the
per-token estimate k_t; summed over a response, sum_t k_t estimates the sequence-level KL(pi || pi_ref). Which
*gradient* a configuration produces depends on the estimator and on where it is placed (`klrl.core.losses`): that
verdict is computed, never typed, by `klrl.audit.verdicts.verdict` from an exact enumeration through the trainer's
own loss, and every table, test and README row takes it from there (`klrl audit --config 'k3*'` shows it).

Adding an estimator: one registered function here (plus conf/estimator/<name>.yaml to make it a config choice);
the audit, `klrl table`'s Table 1, the exact-gradient test matrix and the README's tables pick it up.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Estimator = Callable[[Tensor], Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make `fn(delta [..]) -> k [..]` available as estimator `name` everywhere."""

    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


@register("k1")
def k1(delta: Tensor) -> Tensor:
    """k1 = log(pi/pi_ref) = delta. Value unbiased for KL(pi||pi_ref); d k1 = d log pi(y_t|s_t) (Schulman 2020)."""
    return delta


@register("k2")
def k2(delta: Tensor) -> Tensor:
    """k2 = delta^2 / 2. Value biased (second order near pi = pi_ref); d k2 = delta * d log pi(y_t|s_t)."""
    return 0.5 * delta * delta


@register("k3")
def k3(delta: Tensor) -> Tensor:
    """k3 = pi_ref/pi - 1 - log(pi_ref/pi) = exp(-delta) - 1 + delta >= 0 (Schulman's "low variance"; verl
    low_var_kl, GRPO). Value unbiased for KL(pi||pi_ref); d k3 = (1 - pi_ref/pi) * d log pi(y_t|s_t)."""
    return torch.expm1(-delta) + delta


@register("abs")
def abs_(delta: Tensor) -> Tensor:
    """|delta| (verl's `abs`). Value biased (an upper bound of |k1|); d |delta| = sign(delta) * d log pi."""
    return delta.abs()


def straight_through(value: Estimator, gradient: Estimator = k2) -> Estimator:
    """The value of `value`, the gradient of `gradient`: g - sg(g) + sg(value) (verl's `k1+` / `k3+`, PR #2953).

    `kl_values` applies the clamps to the value only, as verl does: the gradient stays that of the unclamped k2."""

    def fn(delta: Tensor) -> Tensor:
        g = gradient(delta)
        return g - g.detach() + value(delta).detach()

    fn.value, fn.gradient = value, gradient  # type: ignore[attr-defined]
    fn.__doc__ = f"Straight-through: the value of {value.__name__}, the gradient of {gradient.__name__}."
    return fn


register("k1+")(straight_through(k1))
register("k3+")(straight_through(k3))


def kl_values(delta: Tensor, estimator: str, clamp_log_ratio: float | None = None,
              clamp_value: float | None = None) -> Tensor:
    """Per-token estimates k_t = clamp(estimator(clamp(delta, +-clamp_log_ratio)), +-clamp_value); for a
    straight-through estimator the clamps act on its value, its gradient is that of the unclamped delta.

    Shapes: [...] -> [...]. Either clamp (None = off) zeroes the gradient of the tokens it bites, which changes the
    gradient; frameworks differ (verl, NeMo-RL, SkyRL: log-ratio +-20 then value +-10; OpenRLHF: value +-10;
    open-instruct, OAT: +-40; TRL: none), a confound between estimators, so both are off by default.
    KeyError for an unregistered estimator.
    """
    fn = ESTIMATORS[estimator]
    gradient = getattr(fn, "gradient", None)  # a straight-through estimator: clamps bite its value only
    d = delta if clamp_log_ratio is None else delta.clamp(-clamp_log_ratio, clamp_log_ratio)
    k = getattr(fn, "value", fn)(d)
    if clamp_value is not None:
        k = k.clamp(-clamp_value, clamp_value)
    if gradient is None:
        return k
    g = gradient(delta)
    return g - g.detach() + k.detach()


def sequence_estimates(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sequence-level value of every registered estimator, unclamped: {name: [B] sum_t k_t}, no gradient.

    logp, ref_logp, mask: [B, T]. Padding (mask 0) contributes nothing whatever its log-probs hold."""
    with torch.no_grad():
        real = mask > 0
        delta = torch.where(real, logp - ref_logp, torch.zeros_like(logp))
        return {name: torch.where(real, fn(delta), torch.zeros_like(delta)).sum(-1) for name, fn in ESTIMATORS.items()}
