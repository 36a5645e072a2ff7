"""The training loss: policy gradient with a group baseline plus the KL term in its chosen placement.

Pure functions, tensors in and tensors out. ``policy_loss`` is the one function the trainer differentiates, and the one
the exact-gradient tests and ``klrl audit`` enumerate, so the verdicts they report are those of the code that trains.

Shapes: B sequences laid out as contiguous groups of G samples of the same prompt; T response positions;
``mask`` marks real response tokens (1) versus padding (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from klrl.core.estimators import kl_values

BASELINES = ("rloo", "grpo", "dr_grpo", "rloo_std", "none")
LOSS_WEIGHTS = ("none", "rho", "score", "detached_rho")
STD_KINDS = ("unbiased", "population")
AGGREGATIONS = ("seq_sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
REWARD_FORMS = ("seqsum", "togo")


@dataclass(frozen=True)
class KLSpec:
    """Which KL configuration the loss implements. ``estimator=None`` means no KL term at all."""

    estimator: str | None = None
    beta: float = 0.0
    in_reward: bool = False
    reward_form: str = "seqsum"
    reward_is_weight: bool = False
    in_loss: bool = False
    loss_is_weight: bool = False  # the in-loss term as rho_t * k_t (= loss_weight "rho")
    clamp_log_ratio: float | None = None  # clamp delta to +-c before the estimator (None = off)
    clamp_value: float | None = None  # clamp the estimate to +-c (None = off)
    loss_weight: str = "none"  # how the in-loss term is weighted: none | rho | score | detached_rho (LOSS_WEIGHTS)
    clamp_after_weight: bool = False  # clamp_value bites the weighted term (w * k) instead of k
    reward_from_old: bool = False  # the reward-placed estimate from the sampler's log-probs, not the current ones
    loss_agg: str | None = None  # aggregation of the in-loss KL term alone (None: the policy gradient's)

    @property
    def weight(self) -> str:
        return "rho" if self.loss_is_weight else self.loss_weight


@dataclass(frozen=True)
class PGSpec:
    """Policy-gradient side: baseline, loss aggregation and off-policy ratio handling."""

    baseline: str = "rloo"
    agg: str = "seq_sum"
    agg_norm: float | None = None  # seq_mean_token_sum_norm's constant: the generation budget (max new tokens)
    ratio_clip: float | None = None  # PPO epsilon; None = plain importance-weighted REINFORCE
    is_truncate: float | None = None  # cap on the token importance ratio (truncated IS); None = no cap
    adv_eps: float = 1e-6  # grpo / rloo_std: added to the group std
    adv_std: str = "unbiased"  # grpo: the group std with Bessel's correction (unbiased) or without (population)
    dual_clip: float | None = None  # PPO dual clip c > 1: negative-advantage tokens' loss capped at -c A
    ratio_log_clamp: float | None = None  # clamp log(pi/pi_old) to +-c before exp in the policy-gradient ratio


class LossOut(NamedTuple):
    loss: Tensor  # scalar that the trainer differentiates
    per_seq: Tensor  # [B] contributions with loss == per_seq.mean()
    stats: dict[str, Tensor]  # detached diagnostics


def group_advantages(rewards: Tensor, group_size: int, baseline: str, eps: float = 1e-6, std: str = "unbiased"
                     ) -> Tensor:
    """Advantages from a group baseline, [B] -> [B].

    rloo:     A_i = R_i - mean_{j != i} R_j. The baseline is independent of sample i, so the estimator stays unbiased.
    dr_grpo:  A_i = R_i - mean_j R_j. The mean includes R_i itself, which shrinks the expected gradient by (1 - 1/G).
    grpo:     A_i = (R_i - mean_j R_j) / (std_j R_j + eps). Biased (per-group rescaling), the GRPO default; std with
              Bessel's correction ("unbiased", TRL, verl) or without ("population", open-instruct).
    rloo_std: A_i = (R_i - b_i) / (s_i + eps), b_i and s_i the mean and sample std of the other G - 1 rewards
              (NeMo-RL's leave-one-out GRPO; A_i = R_i - b_i where s_i = 0).
    none:     A_i = R_i (plain REINFORCE).
    """
    if baseline == "none":
        return rewards
    r = rewards.view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if baseline == "rloo":
        adv = centred * (group_size / (group_size - 1))
    elif baseline == "dr_grpo":
        adv = centred
    elif baseline == "grpo":
        adv = centred / (r.std(-1, keepdim=True, correction=int(std == "unbiased")) + eps)
    elif baseline == "rloo_std":
        adv = leave_one_out_standardised(r, eps)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
    return adv.reshape(-1)


def leave_one_out_standardised(r: Tensor, eps: float) -> Tensor:
    """[groups, G] -> (R_i - b_i) / (s_i + eps) with the mean b_i and sample std s_i of the other G - 1 rewards."""
    G = r.shape[-1]
    b = (r.sum(-1, keepdim=True) - r) / (G - 1)
    if G < 3:  # one other reward: no spread to divide by
        return r - b
    q = ((r * r).sum(-1, keepdim=True) - r * r) / (G - 1)
    s = ((q - b * b).clamp(min=0) * (G - 1) / (G - 2)).sqrt()
    return torch.where(s > 0, (r - b) / (s + eps), r - b)


def reward_to_go(x: Tensor) -> Tensor:
    """sum_{t' >= t} x_{t'} along the last axis."""
    return x.flip(-1).cumsum(-1).flip(-1)


def pg_term(ratio: Tensor, adv: Tensor, pg: PGSpec) -> Tensor:
    """Per-token policy-gradient loss from the importance ratio rho_t = pi/pi_old and advantages.

    default:   -rho_t * A_t. On-policy rho = 1 in value and grad rho = grad log pi, so this is REINFORCE.
    truncated: -min(rho_t, c) * A_t; tokens whose ratio is capped get no gradient (the authors' async code, c = 8).
    ppo:       -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t), with dual_clip c: capped at -c A where A < 0.
    """
    if pg.ratio_clip is not None:
        eps = pg.ratio_clip
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        if pg.dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -pg.dual_clip * adv), loss)
        return loss
    if pg.is_truncate is not None:
        return -ratio.clamp(max=pg.is_truncate) * adv
    return -ratio * adv


def aggregate(per_token: Tensor, mask: Tensor, agg: str, token_norm: float | Tensor | None = None,
              agg_norm: float | None = None) -> tuple[Tensor, Tensor]:
    """Reduce masked per-token losses [B, T] to (scalar, [B] per-sequence contributions), scalar = per_seq.mean().

    seq_sum:                 mean_i sum_t l_it. The gradient of the sequence-level objective, unscaled (the paper's).
    token_mean:              sum_it l_it / sum_it m_it. Every token weighs the same; long responses weigh more
                             (TRL's `dapo`/`bnpo`, verl's `token-mean`).
    seq_mean_token_mean:     mean_i (sum_t l_it / T_i). Original GRPO; down-weights long responses' tokens.
    seq_mean_token_sum_norm: mean_i (sum_t l_it) / agg_norm, a constant (Dr. GRPO: the generation budget; verl's
                             `seq-mean-token-sum-norm`, TRL's `dr_grpo`): seq_sum scaled by 1 / agg_norm.
    token_norm: tokens per sequence over the *whole* batch, so that token_mean stays exact when the batch is split
    into micro-batches or data-parallel shards (default: this call's own mean); a [B] tensor gives each row its
    own (the audit's toys, where every group is a batch). ValueError for an unknown agg.
    """
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    if agg == "seq_sum":
        per_seq = per_token.sum(-1)
    elif agg == "token_mean":
        norm = token_norm if token_norm is not None else (mask.sum() / mask.shape[0]).clamp(min=1e-9)
        per_seq = per_token.sum(-1) / norm
    elif agg == "seq_mean_token_mean":
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    elif agg == "seq_mean_token_sum_norm":
        if agg_norm is None or not agg_norm > 0:
            raise ValueError(f"aggregation {agg} needs a positive agg_norm, got {agg_norm!r}")
        per_seq = per_token.sum(-1) / agg_norm
    else:
        raise ValueError(f"unknown aggregation {agg!r}; choose from {', '.join(AGGREGATIONS)}")
    return per_seq.mean(), per_seq


class KLTerms(NamedTuple):
    rewards: Tensor  # [B] task rewards minus the seqsum penalty (what the baseline sees)
    token_shift: Tensor  # [B, T] the reward-to-go penalty, subtracted from the advantages after the baseline
    extra: Tensor  # [B, T] the sequence-weighted reward penalty's score-function term, beside the policy gradient
    in_loss: Tensor  # [B, T] the in-loss KL term
    stats: dict


def reward_penalty(logp, old_logp, ref_logp, real, log_rho, rewards, group_size, kl: KLSpec, out: KLTerms) -> KLTerms:
    """The KL placed in the reward: beta * sum_t sg(k_t) before the baseline (seqsum), per token after it (togo),
    or as its own sequence-importance-weighted score-function term (reward_is_weight)."""
    zero = torch.zeros_like(logp)
    source = old_logp if kl.reward_from_old else logp  # verl, TRL's RLOO, OpenRLHF: the sampler's log-probs
    delta = torch.where(real, source - ref_logp, zero)
    penalty = kl.beta * torch.where(real, kl_values(delta, kl.estimator, kl.clamp_log_ratio, kl.clamp_value),
                                    zero).detach()
    stats = {"kl/reward_penalty": penalty.sum(-1).mean()}
    if kl.reward_is_weight:
        seq_pen = penalty.sum(-1).view(-1, group_size)
        loo = (seq_pen.sum(-1, keepdim=True) - seq_pen) / (group_size - 1)
        w = torch.exp(log_rho.sum(-1)).detach()
        stats["is/seq_weight_mean"] = w.mean()
        return out._replace(extra=(w * (seq_pen - loo).reshape(-1))[:, None] * logp, stats={**out.stats, **stats})
    if kl.reward_form == "seqsum":
        return out._replace(rewards=rewards - penalty.sum(-1), stats={**out.stats, **stats})
    return out._replace(token_shift=reward_to_go(penalty), stats={**out.stats, **stats})


def loss_term(logp: Tensor, ref_logp: Tensor, real: Tensor, ratio: Tensor, kl: KLSpec) -> Tensor:
    """The KL placed in the loss, per token, weighted as kl.weight says:
      none:         beta * k_t                                 (pathwise term only)
      rho:          beta * rho_t k_t, rho_t = pi/pi_old        (DeepSeek-V3.2, TRL use_bias_correction_kl, slime)
      score:        beta * exp(l_t - sg(l_t)) k_t              (NeMo-RL: value k_t, gradient grad k_t + k_t grad l_t)
      detached_rho: beta * (sg(k_t) + sg(rho_t delta_t)(l_t - sg(l_t)))   (OpenRLHF unbiased_gradient: the value of
                    k_t, the gradient rho_t delta_t grad l_t)
    With clamp_after_weight the value clamp bites w * k_t (slime, NeMo-RL) rather than k_t."""
    zero = torch.zeros_like(logp)
    delta = torch.where(real, logp - ref_logp, zero)
    value_clamp = None if kl.clamp_after_weight else kl.clamp_value
    k = torch.where(real, kl_values(delta, kl.estimator, kl.clamp_log_ratio, value_clamp), zero)
    if kl.weight == "detached_rho":
        term = k.detach() + (ratio * delta).detach() * (logp - logp.detach())
    else:
        w = {"none": 1.0, "rho": ratio, "score": torch.exp(logp - logp.detach())}[kl.weight]
        term = w * k
    if kl.clamp_after_weight and kl.clamp_value is not None:
        term = term.clamp(-kl.clamp_value, kl.clamp_value)
    return kl.beta * torch.where(real, term, zero)


def kl_terms(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, real: Tensor, log_rho: Tensor, ratio: Tensor,
             rewards: Tensor, group_size: int, kl: KLSpec) -> KLTerms:
    """Where the KL enters the loss: the reward (seqsum / togo / sequence-weighted), the loss, or both."""
    zero = torch.zeros_like(logp)
    out = KLTerms(rewards, zero, zero, zero, {})
    if kl.estimator is None:
        return out
    if kl.in_reward:
        out = reward_penalty(logp, old_logp, ref_logp, real, log_rho, rewards, group_size, kl, out)
    if kl.in_loss:
        term = loss_term(logp, ref_logp, real, ratio, kl)
        out = out._replace(in_loss=term, stats={**out.stats, "loss/kl": term.sum(-1).mean().detach()})
    return out


@torch.no_grad()
def diagnostics(pg_tok: Tensor, adv: Tensor, ratio: Tensor, log_rho: Tensor, mask: Tensor, pg: PGSpec) -> dict:
    n = mask.sum().clamp(min=1)
    stats = {
        "loss/pg": (pg_tok * mask).sum(-1).mean(),
        "adv/mean": adv.mean(),
        "adv/std": adv.std() if adv.numel() > 1 else torch.zeros(()),
        "ratio/mean": (ratio * mask).sum() / n,
        "ratio/max": (ratio * mask + (mask - 1) * 1e9).max() if mask.any() else torch.ones(()),
    }
    seq_w = torch.exp(log_rho.sum(-1))
    stats["is/ess"] = seq_w.sum() ** 2 / (seq_w.numel() * (seq_w**2).sum()).clamp(min=1e-30)  # 1 = on-policy
    if pg.ratio_clip is not None:
        clipped = (ratio - ratio.clamp(1 - pg.ratio_clip, 1 + pg.ratio_clip)).abs() > 0
        stats["ratio/clip_frac"] = (clipped * mask).sum() / n
    elif pg.is_truncate is not None:
        stats["ratio/clip_frac"] = ((ratio > pg.is_truncate) * mask).sum() / n
    return stats


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    pg: PGSpec,
    kl: KLSpec,
    token_norm: float | Tensor | None = None,
) -> LossOut:
    """The loss for one batch.

    logp:     [B, T] log pi_theta(y_t|s_t), differentiable.
    old_logp: [B, T] log-probs of the policy that sampled the batch (detached; equal to logp on-policy).
    ref_logp: [B, T] log pi_ref(y_t|s_t) (detached).
    rewards:  [B] task rewards.

    KL placements (beta = kl.beta, k_t = estimator(delta_t), sg = stop-gradient):
      reward, seqsum: R_i <- R_i - beta * sum_t sg(k_t), before the baseline (score-function term only; with grpo
                      the penalty is then rescaled by the group std, the verl semantics).
      reward, togo:   per-token A_it <- A_i - beta * sum_{t'>=t} sg(k_t'), after the baseline (reward-to-go,
                      outside any normalisation, the OpenRLHF semantics). Unbiased for k1: it drops only
                      past-token terms, which have zero mean.
      reward, is:     with reward_is_weight the reward-placed penalty enters as its own score-function term
                      beta * sg(w_i (K_i - mean_{j!=i} K_j)) * log pi(y_i), w_i = prod_t pi/pi_old, which keeps the
                      sequence-level reverse-KL gradient unbiased off-policy.
      loss:           + beta * k_t (pathwise term only), or + beta * rho_t * k_t with loss_is_weight, rho_t =
                      pi/pi_old differentiable (DeepSeek-V3.2); on-policy rho * k3 has the gradient of k2.
    """
    real = mask > 0
    zero = torch.zeros_like(logp)
    # Padding is masked *before* anything nonlinear: whatever log-probs it holds, exp or k3 of them never make a
    # NaN (inf * 0) that the mask would then have to hide.
    log_rho = torch.where(real, logp - old_logp, zero)
    ratio = torch.exp(log_rho)
    kl_part = kl_terms(logp, old_logp, ref_logp, real, log_rho, ratio, rewards, group_size, kl)
    adv = group_advantages(kl_part.rewards, group_size, pg.baseline, pg.adv_eps, pg.adv_std)
    pg_ratio = ratio if pg.ratio_log_clamp is None else torch.exp(log_rho.clamp(-pg.ratio_log_clamp, pg.ratio_log_clamp))
    pg_tok = pg_term(pg_ratio, adv[:, None] - kl_part.token_shift, pg)
    if kl.loss_agg is None:  # one aggregation for everything (it is linear: the same as aggregating each part)
        loss, per_seq = aggregate(pg_tok + kl_part.extra + kl_part.in_loss, mask, pg.agg, token_norm, pg.agg_norm)
    else:  # the KL term has its own (SkyRL: seq_mean_token_mean beside a token_mean policy gradient)
        loss, per_seq = aggregate(pg_tok + kl_part.extra, mask, pg.agg, token_norm, pg.agg_norm)
        kl_loss, kl_seq = aggregate(kl_part.in_loss, mask, kl.loss_agg, token_norm, pg.agg_norm)
        loss, per_seq = loss + kl_loss, per_seq + kl_seq
    stats = {**kl_part.stats, **diagnostics(pg_tok, adv, ratio, log_rho, mask.to(logp.dtype), pg)}
    return LossOut(loss, per_seq, stats)
