"""Independent oracles of the KL settings that RL frameworks actually run, one per preset of conf/preset/.

Each oracle is written from the framework's math (read in its source at the commit named in the docstring, restated
here in our own code; nothing is imported from klrl and nothing is copied from the frameworks). The formulas, the
source links and what klrl reproduces are in docs/frameworks.md; tests/test_presets.py compares every preset's
real loss (composed from its Hydra config) with its oracle.

Common signature
    oracle_<id>(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs) -> {"per_token_kl", "loss"}

    logp      [B, T] float64, requires grad: log pi_theta(y_t | s_t) of the sampled tokens (current policy).
    old_logp  [B, T] detached: log-probs of the behaviour / old policy (equal to logp.detach() on-policy).
    ref_logp  [B, T] detached: log-probs of the reference policy.
    mask      [B, T] 0/1: real response tokens.
    rewards   [B] task rewards; B = groups * group_size, contiguous groups.
    beta      the framework's KL coefficient (kl_loss_coef, init_kl_coef, beta, ...).

    per_token_kl  [B, T] the per-token KL values the framework computes for this setting (0 on padding, detached),
                  on the log-probs the framework evaluates them on (pi_theta for loss placements, pi_old for reward
                  placements).
    loss          scalar whose autograd gradient w.r.t. logp is the framework's gradient: policy-gradient term
                  (framework's advantage estimator, PPO clipping, aggregation) plus its KL term.

Every framework here runs single-process/single-micro-batch in the oracle: "token mean" means sum over all masked
tokens of the batch divided by their count (the multi-GPU normalisers of verl/TRL/NeMo-RL/SkyRL reduce to this).
Padding positions are removed with torch.where *before* any nonlinearity, so arbitrary padding log-probs never turn
into NaN/inf.

The knobs that reproduce each oracle in klrl are the preset's YAML (conf/preset/<id>.yaml), and what klrl does not
reproduce is its `preset.differs` field; the oracles' keyword defaults are the frameworks' own defaults.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------
# small helpers (own code)
# ----------------------------------------------------------------------------------------------------------------


def _real(mask: Tensor) -> Tensor:
    return mask > 0


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    """x on real tokens, 0 on padding (no NaN leaks through multiplication by 0)."""
    return torch.where(_real(mask), x, torch.zeros_like(x))


def _sg(x: Tensor) -> Tensor:
    return x.detach()


def _sanitized(fn):
    """Decorator: replace the three log-prob tensors by 0 on padding before the oracle runs, so every log-ratio is
    exactly 0 there (finite values and finite gradients whatever the padding held); the oracle still zero-pads its
    outputs. Gradient w.r.t. logp at padding is 0."""

    def wrapped(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
        real = _real(mask)
        zero = torch.zeros_like(logp)
        logp = torch.where(real, logp, zero)
        old_logp = torch.where(real, old_logp, zero).detach()
        ref_logp = torch.where(real, ref_logp, zero).detach()
        return fn(logp, old_logp, ref_logp, mask.to(logp.dtype), rewards.to(logp.dtype), group_size, beta, **knobs)

    wrapped.__name__ = fn.__name__
    wrapped.__qualname__ = fn.__qualname__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _estimate(delta: Tensor, name: str) -> Tensor:
    """Schulman's estimators of KL(pi || pi_ref) as functions of delta = log pi - log pi_ref."""
    if name == "k1":
        return delta
    if name == "abs":
        return delta.abs()
    if name == "k2":
        return 0.5 * delta * delta
    if name == "k3":
        # r = pi_ref / pi = exp(-delta);  k3 = r - 1 - log r
        return torch.exp(-delta) - 1.0 + delta
    raise ValueError(f"unknown estimator {name!r}")


def _groups(x: Tensor, g: int) -> Tensor:
    return x.reshape(-1, g)


def _adv_mean_std(r: Tensor, g: int, eps: float, unbiased: bool = True, scale: bool = True) -> Tensor:
    """(R_i - mean_group) / (std_group + eps); std unbiased (n-1) or population (n)."""
    rg = _groups(r, g)
    centred = rg - rg.mean(-1, keepdim=True)
    if scale:
        centred = centred / (rg.std(-1, keepdim=True, unbiased=unbiased) + eps)
    return centred.reshape(-1)


def _adv_leave_one_out(r: Tensor, g: int) -> Tensor:
    """R_i - mean_{j != i} R_j."""
    rg = _groups(r, g)
    others = (rg.sum(-1, keepdim=True) - rg) / (g - 1)
    return (rg - others).reshape(-1)


def _token_mean(x: Tensor, mask: Tensor, extra_eps: float = 0.0) -> Tensor:
    return _zero_pad(x, mask).sum() / (mask.sum() + extra_eps)


def _seq_mean_token_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (_zero_pad(x, mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _ppo_token(
    logp: Tensor,
    old_logp: Tensor,
    adv_tok: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
) -> Tensor:
    """Per-token PPO surrogate loss: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), optional dual clip for A < 0
    (min with -A c), optional clamp of log r before exp."""
    log_r = _zero_pad(logp - old_logp, mask)
    if log_ratio_clamp is not None:
        log_r = log_r.clamp(-log_ratio_clamp, log_ratio_clamp)
    r = torch.exp(log_r)
    surrogate = torch.maximum(-adv_tok * r, -adv_tok * r.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        surrogate = torch.where(adv_tok < 0, torch.minimum(surrogate, -adv_tok * dual_clip), surrogate)
    return surrogate


def _aggregate(x: Tensor, mask: Tensor, mode: str, norm: float | None = None, extra_eps: float = 0.0) -> Tensor:
    if mode == "token_mean":
        return _token_mean(x, mask, extra_eps)
    if mode == "seq_mean_token_mean":
        return _seq_mean_token_mean(x, mask)
    if mode == "seq_mean_token_sum":
        return _zero_pad(x, mask).sum(-1).mean()
    if mode == "seq_mean_token_sum_norm":
        if norm is None:
            norm = float(mask.shape[-1])  # verl default: the padded response length
        return _zero_pad(x, mask).sum(-1).mean() / norm
    raise ValueError(f"unknown aggregation {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# verl (verl-project/verl)
# ----------------------------------------------------------------------------------------------------------------


def _verl_kl(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    """verl core_algos.kl_penalty: k1 ('kl'), 'abs', k2 ('mse'), k3 ('low_var_kl': log-ratio clamped to +-20, value
    clamped to +-10). A trailing '+' keeps that value and takes the gradient of k2 of the *unclamped* delta."""
    straight = kind.endswith("+") and kind not in ("mse+", "k2+")
    base = kind[:-1] if kind.endswith("+") else kind
    delta = logprob - ref_logprob
    if base in ("kl", "k1"):
        value = delta
    elif base == "abs":
        value = delta.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * delta * delta
    elif base in ("low_var_kl", "k3"):
        neg = (ref_logprob - logprob).clamp(-20.0, 20.0)  # log(pi_ref / pi), clamped
        value = (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)
    else:
        raise ValueError(kind)
    if not straight:
        return value
    back = 0.5 * delta * delta
    return back - _sg(back) + _sg(value)


@_sanitized
def oracle_verl_grpo_kl_loss(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_loss_type: str = "low_var_kl", loss_agg_mode: str = "token_mean", clip_ratio: float = 0.2,
    clip_ratio_c: float = 3.0, norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6,
    loss_scale_factor: float | None = None,
):
    """verl GRPO recipe: actor.use_kl_loss=True, kl_loss_type=low_var_kl, kl_loss_coef=beta (default 0.001),
    algorithm.adv_estimator=grpo, use_kl_in_reward=False, loss_agg_mode=token-mean, clip 0.2, dual-clip c=3.

    kl_t = clamp(k3(clamp(logp_t - ref_t, +-20)), +-10) on pi_theta (with grad)      [core_algos.kl_penalty_forward]
    A_i  = (R_i - mean_g R) / (std_g R (unbiased) + 1e-6)                             [compute_grpo_outcome_advantage]
    pg_t = dual-clip PPO with r_t = exp(clamp(logp - old, +-20))                        [compute_policy_loss_vanilla]
    loss = agg(pg) + beta * agg(kl), same loss_agg_mode                                 [workers/utils/losses.ppo_loss]
    Source: verl-project/verl@018f23b5 verl/trainer/ppo/core_algos.py (kl_penalty ~L2187 at 1dda039),
    verl/workers/utils/losses.py (L132-142 at 1dda039), verl/trainer/config/actor/actor.yaml.
    """
    kl = _zero_pad(_verl_kl(logp, ref_logp, kl_loss_type), mask)
    adv = _adv_mean_std(rewards, group_size, epsilon, unbiased=True, scale=norm_adv_by_std_in_grpo)
    adv_tok = adv[:, None].expand_as(logp)
    pg = _ppo_token(logp, old_logp, adv_tok, mask, clip_ratio, clip_ratio, clip_ratio_c, log_ratio_clamp=20.0)
    loss = (_aggregate(pg, mask, loss_agg_mode, loss_scale_factor)
            + beta * _aggregate(kl, mask, loss_agg_mode, loss_scale_factor))
    return {"per_token_kl": _sg(kl), "loss": loss}


@_sanitized
def oracle_verl_kl_in_reward(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_penalty: str = "kl", loss_agg_mode: str = "token_mean", clip_ratio: float = 0.2, clip_ratio_c: float = 3.0,
    norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6,
):
    """verl algorithm.use_kl_in_reward=True, kl_penalty=kl (k1), kl_ctrl fixed kl_coef=beta (default 0.001), with
    adv_estimator=grpo (actor.use_kl_loss=False).

    kld_t = k1(old_logp_t, ref_t) (evaluated on pi_old = old_log_probs, no gradient)      [ray_trainer.apply_kl_penalty]
    token_level_rewards = scores - beta * kld;  the GRPO estimator sums them:  S_i = R_i - beta * sum_t kld_t
    A_i = (S_i - mean_g S) / (std_g S + 1e-6)  -- the KL penalty is inside the group z-score
    loss = token-mean dual-clip PPO with A_i (no KL term in the loss)
    Source: verl-project/verl@0094eb20 verl/trainer/ppo/ray_trainer.py apply_kl_penalty (L78 at 1dda039);
    core_algos.compute_grpo_outcome_advantage (L268-304 at 1dda039).
    """
    kld = _zero_pad(_verl_kl(old_logp, ref_logp, kl_penalty), mask).detach()
    scores = rewards - beta * kld.sum(-1)
    adv = _adv_mean_std(scores, group_size, epsilon, unbiased=True, scale=norm_adv_by_std_in_grpo)
    pg = _ppo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, clip_ratio, clip_ratio, clip_ratio_c, 20.0)
    return {"per_token_kl": kld, "loss": _aggregate(pg, mask, loss_agg_mode)}


@_sanitized
def oracle_verl_k3plus(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """verl GRPO recipe with actor.kl_loss_type=k3+ (PR #2953): value = clamped low_var_kl value (detached),
    gradient = gradient of k2 of the *unclamped* delta, i.e. d/dtheta = delta_t * dlogp_t, never zeroed by a clamp.

    kl_t = 0.5 delta^2 - sg(0.5 delta^2) + sg(clamp(k3(clamp(delta, +-20)), +-10))      [core_algos.kl_penalty]
    Everything else as oracle_verl_grpo_kl_loss.  Source: as oracle_verl_grpo_kl_loss, and verl PR #2953.
    """
    knobs.setdefault("kl_loss_type", "k3+")
    return oracle_verl_grpo_kl_loss(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


# ----------------------------------------------------------------------------------------------------------------
# TRL (huggingface/trl)
# ----------------------------------------------------------------------------------------------------------------


@_sanitized
def oracle_trl_grpo(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None, scale_rewards: str = "group",
    use_bias_correction_kl: bool = False, max_completion_length: int | None = None, delta: float | None = None,
):
    """TRL GRPOTrainer, beta > 0 (GRPOConfig default beta=0.0 loads no reference), default loss_type='dapo',
    importance_sampling_level='token', scale_rewards='group', epsilon=0.2.

    kl_t = exp(ref - logp) - (ref - logp) - 1   (k3, NO clamp, on pi_theta with grad)   [GRPOTrainer._compute_loss]
           * coef_1_t = exp(logp - old) (differentiable, unclipped)  if use_bias_correction_kl
    A_i  = (R_i - mean_g R) / (std_g R (unbiased) + 1e-4)   [scale_rewards='group'; 'batch': std over batch; 'none']
    pg_t = -min(coef_1 A, clip(coef_1, 1-eps, 1+eps_high) A)   (coef_1 optionally capped at `delta`)
    per_token_loss = pg_t + beta kl_t, then loss_type:
       dapo / bnpo: sum over tokens / total tokens (dapo: num_items_in_batch = tokens of the global batch)
       grpo: mean_i (sum_t / T_i);   dr_grpo: sum / (B * max_completion_length)
    Source: huggingface/trl grpo_trainer.py L3069-3121 @f2cd577 (per the survey); read at d2b69d7 (older, no dapo) and a
    current-API copy; reward normalisation `advantages / (std_rewards + 1e-4)`; grpo_config.py L577-966 @f2cd577.
    """
    if beta != 0.0:
        neg = ref_logp - logp
        kl = torch.exp(neg) - neg - 1.0
    else:
        kl = torch.zeros_like(logp)
    log_r = _zero_pad(logp - old_logp, mask)
    coef_1 = torch.exp(log_r)
    if use_bias_correction_kl:
        kl = kl * coef_1
    kl = _zero_pad(kl, mask)
    r = _groups(rewards, group_size)
    centred = (r - r.mean(-1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        adv = centred / (r.std(-1, keepdim=True).expand_as(r).reshape(-1) + 1e-4)
    elif scale_rewards == "batch":
        adv = centred / (rewards.std() + 1e-4)
    elif scale_rewards == "none":
        adv = centred
    else:
        raise ValueError(scale_rewards)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    a = adv[:, None].expand_as(logp)
    coef_2 = coef_1.clamp(1.0 - epsilon, 1.0 + eps_high)
    c1 = coef_1 if delta is None else coef_1.clamp(max=delta)
    pg = -torch.minimum(c1 * a, coef_2 * a)
    per_token = pg + beta * kl
    if loss_type in ("dapo", "bnpo"):
        loss = _token_mean(per_token, mask)
    elif loss_type == "grpo":
        loss = _seq_mean_token_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = _zero_pad(per_token, mask).sum() / (logp.shape[0] * max_completion_length)
    else:
        raise ValueError(loss_type)
    return {"per_token_kl": _sg(kl), "loss": loss}


@_sanitized
def oracle_trl_grpo_bias_corrected(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """TRL GRPOTrainer with use_bias_correction_kl=True (PR #4638; default flipped to True by PR #6503, merged
    2026-07-22 -- which release carries it is UNCONFIRMED): kl_t = coef_1_t * k3_t with coef_1 = exp(logp - old)
    differentiable, so on-policy d kl_t = delta_t dlogp_t (the k2 gradient) although its value is k3.
    Token-level IS only (importance_sampling_level='sequence' broadcasts a sequence ratio: issue #6586)."""
    knobs.setdefault("use_bias_correction_kl", True)
    return oracle_trl_grpo(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


@_sanitized
def oracle_trl_rloo(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    epsilon: float = 0.2, epsilon_high: float | None = None, normalize_advantages: bool = False,
):
    """TRL RLOOTrainer (RLOOConfig beta=0.05 default, num_generations=2, normalize_advantages=False, epsilon=0.2).

    per_token_kl_t = old_logp_t - ref_t  (k1 on pi_old, no clamp, no gradient)   [_generate_and_score_completions]
    R'_i = R_i - beta * sum_t per_token_kl_t ;  A_i = R'_i - mean_{j != i} R'_j   (no std division)
    optional: A <- (A - mean A) / (std A + 1e-4) over the batch if normalize_advantages
    SEQUENCE-level ratio rho_i = exp(sum_t (logp - old)); loss = mean_i -min(rho_i A_i, clip(rho_i, 1-e, 1+e_h) A_i)
    (on-policy: gradient = -mean_i A_i sum_t dlogp_it, i.e. seq_sum aggregation)
    Source: huggingface/trl@00313f2 trl/trainer/rloo_trainer.py (L1525-1535 @f2cd577 per the survey), rloo_config.py.
    """
    kl_tok = _zero_pad(old_logp - ref_logp, mask).detach()
    r_shaped = rewards - beta * kl_tok.sum(-1)
    adv = _adv_leave_one_out(r_shaped, group_size)
    if normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-4)
    seq_log_ratio = _zero_pad(logp - old_logp, mask).sum(-1)
    rho = torch.exp(seq_log_ratio)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_seq = -torch.minimum(rho * adv, rho.clamp(1.0 - epsilon, 1.0 + eps_high) * adv)
    return {"per_token_kl": kl_tok, "loss": per_seq.mean()}


# ----------------------------------------------------------------------------------------------------------------
# OpenRLHF
# ----------------------------------------------------------------------------------------------------------------


def _openrlhf_kl(log_probs: Tensor, log_probs_base: Tensor, estimator: str) -> Tensor:
    """openrlhf/models/utils.compute_approx_kl: k1 / k2 / k3 of delta = logp - base, NO log-ratio clamp, the
    result (any estimator, k1 included) clamped to [-10, 10]."""
    return _estimate(log_probs - log_probs_base, estimator).clamp(-10.0, 10.0)


def _openrlhf_shaped(rewards: Tensor, g: int, estimator: str) -> Tensor:
    """Outcome-reward shaping in experience_maker.compute_advantages_and_returns (before any KL is added)."""
    rg = _groups(rewards, g)
    if estimator == "rloo":
        out = rg - (rg.sum(-1, keepdim=True) - rg) / (g - 1)
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        out = rg - rg.mean(-1, keepdim=True)
    elif estimator == "group_norm":
        out = (rg - rg.mean(-1, keepdim=True)) / (rg.std(-1, keepdim=True) + 1e-9)
    elif estimator == "reinforce":
        out = rg
    else:
        raise ValueError(estimator)
    return out.reshape(-1)


def _openrlhf_advantages(shaped: Tensor, kl_tok: Tensor, mask: Tensor, kl_coef: float, estimator: str) -> Tensor:
    """compute_reward + get_cumulative_returns (gamma=1): token rewards = -kl_coef * kl_t, plus the shaped outcome
    reward at the last real token; advantage = reward-to-go. REINFORCE++(-baseline) then whitens over all tokens."""
    tok_r = -kl_coef * kl_tok
    last = mask.shape[1] - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)
    tok_r = tok_r.clone()
    tok_r[torch.arange(mask.shape[0]), last] += shaped
    tok_r = _zero_pad(tok_r, mask)
    adv = torch.flip(torch.cumsum(torch.flip(tok_r, dims=[1]), dim=1), dims=[1])
    if estimator in ("reinforce", "reinforce_baseline"):
        n = mask.sum()
        mean = _zero_pad(adv, mask).sum() / n
        var = _zero_pad((adv - mean) ** 2, mask).sum() / n
        adv = (adv - mean) * var.clamp(min=1e-8).rsqrt()
    return adv


@_sanitized
def oracle_openrlhf_kl_reward(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_estimator: str = "k1", advantage_estimator: str = "group_norm", clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
):
    """OpenRLHF default KL placement (--algo.kl.use_loss off): k1 in the reward, --algo.kl.init_coef=beta (default
    0.01), here with a group estimator (default advantage_estimator is gae, which needs a critic; group_norm = GRPO).

    kl_t = clamp(k1(old_logp_t - ref_t), +-10)  (on the rollout-time actor log-probs = pi_old; no gradient)
    r_i  = shaped outcome reward: group_norm (R-mean)/(std+1e-9) | rloo | dr_grpo/reinforce_baseline (R-mean)
    A_it = r_i - beta * sum_{t'>=t} kl_t'   -- reward-to-go, added AFTER the baseline, never divided by the std
           (reinforce/reinforce_baseline additionally whiten A over all tokens of the batch)
    loss = token-mean PPO (clip 0.2/0.2, no log-ratio clamp) with no KL term
    Source: OpenRLHF/OpenRLHF@89308a0 openrlhf/trainer/ppo_utils/experience_maker.py (L276, L380 @3c3be62 per
    survey); openrlhf/models/utils.py compute_approx_kl (L64 @3c3be62), compute_reward; models/loss.py PolicyLoss.
    """
    kl_tok = _zero_pad(_openrlhf_kl(old_logp, ref_logp, kl_estimator), mask).detach()
    shaped = _openrlhf_shaped(rewards, group_size, advantage_estimator)
    adv = _openrlhf_advantages(shaped, kl_tok, mask, beta, advantage_estimator).detach()
    pg = _ppo_token(logp, old_logp, adv, mask, clip_eps_low, clip_eps_high)
    return {"per_token_kl": kl_tok, "loss": _token_mean(pg, mask)}


@_sanitized
def oracle_openrlhf_kl_loss(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_estimator: str = "k3", advantage_estimator: str = "group_norm", clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2, unbiased_gradient: bool = False, kl_is_weight_clip: float | None = None,
):
    """OpenRLHF --algo.kl.use_loss (reward KL forced to 0) with --algo.kl.estimator k3 (the GRPO recipe;
    NOTE the CLI default estimator is k1, i.e. --algo.kl.use_loss alone is k1-in-loss), init_coef=beta.

    kl_t = clamp(k(logp_t - ref_t), +-10) on pi_theta with gradient (no log-ratio clamp)    [compute_approx_kl]
    A_i  = shaped outcome reward broadcast to every token (no KL in it)
    loss = token-mean PPO + beta * token-mean(kl)                                            [ppo_actor.training_step]
    unbiased_gradient=True (PR #1309, merged 2026-08-14, after the pinned commit): value unchanged, gradient
    replaced by w_t * delta_t * dlogp_t with w_t = min(exp(logp - old), C) detached (C = KL_IS_WEIGHT_CLIP,
    value UNCONFIRMED; None = no cap here). The delta in the gradient is the UNclamped one, and the value clamp does
    not zero it (PR's own test at log-ratio -100).
    Source: OpenRLHF/OpenRLHF openrlhf/trainer/ray/ppo_actor.py (L319-337 @3c3be62), models/utils.py; PR #1309 text
    and tests/test_kl_unbiased_gradient (third-party copy).
    """
    delta = logp - ref_logp
    value = _openrlhf_kl(logp, ref_logp, kl_estimator)
    if unbiased_gradient:
        w = torch.exp(_zero_pad(logp - old_logp, mask))
        if kl_is_weight_clip is not None:
            w = w.clamp(max=kl_is_weight_clip)
        kl = _sg(value) + _sg(w * delta) * (logp - _sg(logp))
    else:
        kl = value
    kl = _zero_pad(kl, mask)
    shaped = _openrlhf_shaped(rewards, group_size, advantage_estimator)
    adv = _openrlhf_advantages(shaped, torch.zeros_like(logp), mask, 0.0, advantage_estimator).detach()
    pg = _ppo_token(logp, old_logp, adv, mask, clip_eps_low, clip_eps_high)
    loss = _token_mean(pg, mask) + beta * _token_mean(kl, mask)
    return {"per_token_kl": _sg(kl), "loss": loss}


@_sanitized
def oracle_openrlhf_unbiased(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """OpenRLHF --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.unbiased_gradient (PR #1309)."""
    knobs.setdefault("unbiased_gradient", True)
    return oracle_openrlhf_kl_loss(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


# ----------------------------------------------------------------------------------------------------------------
# open-instruct (allenai/open-instruct, grpo_fast)
# ----------------------------------------------------------------------------------------------------------------


@_sanitized
def oracle_open_instruct(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_estimator: int = 2, clip_lower: float = 0.2, clip_higher: float = 0.2,
    advantage_normalization_type: str = "standard", loss_denominator: str | float = "token",
):
    """open-instruct grpo_fast: KL only in the loss; beta default 0.05; kl_estimator default 2.

    delta_t = clamp(logp - ref, +-40) (with gradient);  ratio_t = exp(logp - old) (with gradient)
    estimate_kl stack: [0] delta, [1] delta^2/2, [2] expm1(-delta) + delta (=k3), [3] ratio * delta (IS-k1)
    A_i = (R_i - mean_g) / (std_g POPULATION (numpy, ddof=0) + 1e-8)  ['standard']; 'centered': R_i - mean_g
    pg_t = max(-A ratio, -A clip(ratio, 1-clip_lower, 1+clip_higher))     (loss_fn='dapo')
    loss = masked_mean(pg + beta kl, mask) with loss_denominator 'token' (all tokens of the batch) or a constant
    Source: allenai/open-instruct grpo_utils.py (config @7ee6655; compute_grpo_loss: `kl_all[config.kl_estimator]`,
    L534 @e6c3044), model_utils.estimate_kl (L793 @e6c3044), advantage code in grpo_fast/data_loader.
    """
    d = (logp - ref_logp).clamp(-40.0, 40.0)
    ratio = torch.exp(_zero_pad(logp - old_logp, mask))
    stack = [d, 0.5 * d * d, torch.expm1(-d) + d, ratio * d]
    kl = _zero_pad(stack[kl_estimator], mask)
    if advantage_normalization_type == "standard":
        adv = _adv_mean_std(rewards, group_size, 1e-8, unbiased=False)
    elif advantage_normalization_type == "centered":
        adv = _adv_mean_std(rewards, group_size, 0.0, scale=False)
    else:
        raise ValueError(advantage_normalization_type)
    a = adv[:, None].expand_as(logp)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_lower, 1.0 + clip_higher))
    per_token = _zero_pad(pg + beta * kl, mask)
    denom = mask.sum() if loss_denominator == "token" else float(loss_denominator)
    return {"per_token_kl": _sg(kl), "loss": per_token.sum() / denom}


@_sanitized
def oracle_open_instruct_k3(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """open-instruct kl_estimator=2 (the default): expm1(-delta) + delta, delta clamped +-40, in the loss."""
    knobs.setdefault("kl_estimator", 2)
    return oracle_open_instruct(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


@_sanitized
def oracle_open_instruct_is_k1(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """open-instruct kl_estimator=3: ratio_t * delta_t with ratio = exp(logp - old) differentiable; gradient
    ratio (delta + 1) dlogp, whose '+1' part has zero mean on-policy (so in expectation the k2 gradient)."""
    knobs.setdefault("kl_estimator", 3)
    return oracle_open_instruct(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


# ----------------------------------------------------------------------------------------------------------------
# slime (THUDM/slime)
# ----------------------------------------------------------------------------------------------------------------


@_sanitized
def oracle_slime_kl_loss(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_loss_type: str = "low_var_kl", use_unbiased_kl: bool = False, eps_clip: float = 0.2,
    eps_clip_high: float | None = None, grpo_std_normalization: bool = True, calculate_per_token_loss: bool = False,
):
    """slime --use-kl-loss --kl-loss-type low_var_kl --kl-loss-coef beta (default 0: must be set), GRPO estimator.

    kl_t = k(logp - ref) on pi_theta (NO log-ratio clamp); with --use-unbiased-kl: kl_t = rho_t * kl_t where
           rho_t = exp(logp - old) is differentiable; THEN, for low_var_kl only, kl_t clamped to +-10 (after rho).
    A_i  = (R_i - mean_g) / (std_g (unbiased) + 1e-6)  (rewards_normalization + grpo_std_normalization)
    pg_t = max(-A r, -A clip(r, 1-eps_clip, 1+eps_clip_high)), r = exp(logp - old) (no clamp, no dual clip)
    loss = sum_of_sample_mean: mean_i (sum_t x_it / T_i) (global_batch_size normaliser) for pg and kl alike;
           --calculate-per-token-loss: token mean
    Source: THUDM/slime@501dae9 slime/utils/ppo_utils.py compute_approx_kl, compute_policy_loss;
    @2fc4883 slime/backends/megatron_utils/loss.py policy_loss_function, loss_function; rollout reward
    post-processing (group mean, / (std + 1e-6)).
    """
    delta = logp - ref_logp
    kl = _estimate(delta, "k3" if kl_loss_type in ("k3", "low_var_kl") else kl_loss_type)
    if use_unbiased_kl:
        kl = torch.exp(_zero_pad(logp - old_logp, mask)) * kl
    if kl_loss_type == "low_var_kl":
        kl = kl.clamp(-10.0, 10.0)
    kl = _zero_pad(kl, mask)
    adv = _adv_mean_std(rewards, group_size, 1e-6, unbiased=True, scale=grpo_std_normalization)
    high = eps_clip if eps_clip_high is None else eps_clip_high
    pg = _ppo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, eps_clip, high)
    agg = "token_mean" if calculate_per_token_loss else "seq_mean_token_mean"
    loss = _aggregate(pg, mask, agg) + beta * _aggregate(kl, mask, agg)
    return {"per_token_kl": _sg(kl), "loss": loss}


@_sanitized
def oracle_slime_unbiased_kl(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs):
    """slime --use-kl-loss --kl-loss-type low_var_kl --use-unbiased-kl (PR #1004): clamp(rho k3, +-10)."""
    knobs.setdefault("use_unbiased_kl", True)
    return oracle_slime_kl_loss(logp, old_logp, ref_logp, mask, rewards, group_size, beta, **knobs)


# ----------------------------------------------------------------------------------------------------------------
# NeMo-RL (NVIDIA-NeMo/RL)
# ----------------------------------------------------------------------------------------------------------------


def _nemo_grpo_advantage(rewards: Tensor, g: int, leave_one_out: bool = True, normalize: bool = True) -> Tensor:
    """GRPOAdvantageEstimator + calculate_baseline_and_std_per_prompt: baseline b_i and std s_i from the *other*
    samples (leave_one_out) or all samples; s_i = sqrt((mean(R^2) - b_i^2) * n/(n-1)), NaN -> 0 (n=G-1 or G);
    A_i = (R_i - b_i) / (s_i + 1e-6) where s_i > 0, else R_i - b_i."""
    rg = _groups(rewards, g)
    total, total_sq = rg.sum(-1, keepdim=True), (rg * rg).sum(-1, keepdim=True)
    if leave_one_out:
        n = g - 1
        base = (total - rg) / n
        sq = (total_sq - rg * rg) / n
    else:
        n = g
        base = (total / n).expand_as(rg)
        sq = (total_sq / n).expand_as(rg)
    with torch.no_grad():
        factor = torch.tensor(float(n) / (n - 1) if n > 1 else float("inf"), dtype=rg.dtype)
        std = ((sq - base * base) * factor).sqrt().nan_to_num(0.0)
    adv = rg - base
    if normalize:
        adv = torch.where(std > 0, adv / (std + 1e-6), adv)
    return adv.reshape(-1)


def _nemo_kl(logp: Tensor, ref_logp: Tensor, kind: str, weight: Tensor | None,
             in_clamp: float | None = 20.0, out_clamp: float | None = 10.0) -> Tensor:
    """calculate_kl after PR #2506: delta = logp - ref clamped to +-in_clamp; where the clamp bites the importance
    weight is detached; k(delta) (k1, k2, k3 = exp(-delta) - 1 + delta); kl = weight * k; THEN clamp +-out_clamp."""
    delta = logp - ref_logp
    if in_clamp is not None:
        clamped = delta.clamp(-in_clamp, in_clamp)
        if weight is not None:
            weight = torch.where(delta == clamped, weight, _sg(weight))
        delta = clamped
    kl = _estimate(delta, kind)
    if weight is not None:
        kl = weight * kl
    if out_clamp is not None:
        kl = kl.clamp(-out_clamp, out_clamp)
    return kl


@_sanitized
def oracle_nemo_rl_default(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    reference_policy_kl_type: str = "k3", ratio_clip_min: float = 0.2, ratio_clip_max: float = 0.2,
    ratio_clip_c: float | None = None, use_leave_one_out_baseline: bool = True, normalize_rewards: bool = True,
    token_level_loss: bool = True, score_function_weight: bool = True,
):
    """NeMo-RL GRPO default: reference_policy_kl_penalty=beta (0.01), k3, kl_input_clamp 20, kl_output_clamp 10,
    use_kl_in_reward=False, token_level_loss=True; since PR #2506 (2026-06) the KL carries its score-function term.

    w_t  = exp(logp_t - sg(logp_t))  (value 1, d w = dlogp)   [use_on_policy_kl_approximation=False branch]
    kl_t = clamp(w_t * k3(clamp(delta_t, +-20)), +-10), w_t detached where |delta_t| > 20
         => unclamped gradient (k3_t + 1 - r_t) dlogp_t = delta_t dlogp_t (token-level reverse-KL = k2's gradient)
    A_i  = leave-one-out GRPO (see _nemo_grpo_advantage)
    pg_t = max(-A r, -A clip(r, 1-min, 1+max)), r = exp(logp - prev) (no clamp; dual clip if ratio_clip_c)
    loss = token-mean(pg) + token-mean(kl) (global valid tokens, + 1e-8 in the denominator);
           token_level_loss=False: mean over samples of per-sample token means
    score_function_weight=False gives the pre-#2506 loss (plain k3 in the loss).
    Source: NVIDIA-NeMo/RL loss_functions.py L469-503 @7ea279a (per the survey) and post-#2506 copies;
    @3520fc0 nemo_rl/algorithms/loss/loss_functions.py ClippedPGLossFn (pg, reductions);
    @7fb98c8 nemo_rl/algorithms/utils.py calculate_kl / calculate_baseline_and_std_per_prompt / masked_mean;
    @165f994 advantage_estimator.py GRPOAdvantageEstimator. Weight-before-output-clamp and the detach under the input
    clamp are from third-party mirrors of the post-#2506 calculate_kl: UNCONFIRMED upstream.
    """
    weight = torch.exp(logp - _sg(logp)) if score_function_weight else None
    kl = _zero_pad(_nemo_kl(logp, ref_logp, reference_policy_kl_type, weight), mask)
    adv = _nemo_grpo_advantage(rewards, group_size, use_leave_one_out_baseline, normalize_rewards)
    pg = _ppo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, ratio_clip_min, ratio_clip_max, ratio_clip_c)
    if token_level_loss:
        loss = _token_mean(pg, mask, 1e-8) + beta * _token_mean(kl, mask, 1e-8)
    else:
        loss = _seq_mean_token_mean(pg, mask) + beta * _seq_mean_token_mean(kl, mask)
    return {"per_token_kl": _sg(kl), "loss": loss}


@_sanitized
def oracle_nemo_rl_grpo_kl_in_reward(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    ratio_clip_min: float = 0.2, ratio_clip_max: float = 0.2, use_leave_one_out_baseline: bool = True,
    normalize_rewards: bool = True,
):
    """NeMo-RL GRPO with loss_fn.use_kl_in_reward=True: the loss-side KL is switched off and GRPOAdvantageEstimator
    never reads the KL (only ReinforcePlusPlus / GAE estimators do), so NO KL acts at all, whatever beta.

    per_token_kl = 0 (nothing is computed into the objective); loss = token-mean PPO with leave-one-out GRPO A.
    Source: NVIDIA-NeMo/RL@165f994 nemo_rl/algorithms/advantage_estimator.py (GRPOAdvantageEstimator has no KL code;
    ReinforcePlusPlusAdvantageEstimator uses use_kl_in_reward); loss zeroing per the survey (L57, L193-259, L330-394 of
    advantage_estimator.py @7ea279a) -- read from source, never executed: UNCONFIRMED.
    """
    del beta, ref_logp
    adv = _nemo_grpo_advantage(rewards, group_size, use_leave_one_out_baseline, normalize_rewards)
    pg = _ppo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, ratio_clip_min, ratio_clip_max)
    return {"per_token_kl": torch.zeros_like(logp).detach(), "loss": _token_mean(pg, mask, 1e-8)}


# ----------------------------------------------------------------------------------------------------------------
# SkyRL (NovaSky-AI/SkyRL)
# ----------------------------------------------------------------------------------------------------------------


@_sanitized
def oracle_skyrl_default(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta,
    kl_estimator_type: str = "k3", eps_clip_low: float = 0.2, eps_clip_high: float = 0.2,
    loss_reduction: str = "token_mean", grpo_norm_by_std: bool = True, max_seq_len: int | None = None,
):
    """SkyRL default: use_kl_loss=True, kl_loss_coef=beta (0.001), kl_estimator_type=k3, advantage_estimator=grpo,
    policy_loss_type=regular, loss_reduction=token_mean, use_kl_in_reward=False.

    kl_t = clamp(k3(clamp(delta, +-20)), +-10) on pi_theta (verl's formula)                 [compute_approx_kl]
    A_i  = (R_i - mean_g) / (std_g (unbiased) + 1e-6)                                       [GRPO estimator]
    pg_t = -min(r A, clip(r, 1-lo, 1+hi) A), r = exp(clamp(logp - old, 20)) (safe_exp_delta, clip=20)
    PG reduction by loss_reduction (token_mean: A / total tokens, then summed)  BUT the KL term is ALWAYS
    mean_i (sum_t kl_it / T_i) -- per-sequence token mean, then mean over sequences -- whatever loss_reduction is.
    Source: NovaSky-AI/SkyRL@ec60959 skyrl/backends/skyrl_train/utils/ppo_utils.py (compute_approx_kl,
    ppo_policy_loss, apply_loss_reduction_to_advantages_minibatch, compute_grpo_outcome_advantage); worker KL term
    `masked_mean(kl, loss_mask, dim=-1).mean()`; config skyrl/train/config/config.py L823-876 @a956457 (survey).
    """
    kl = _zero_pad(_verl_kl(logp, ref_logp, {"k1": "kl", "k2": "mse", "k3": "low_var_kl", "abs": "abs"}[
        kl_estimator_type]), mask)
    adv = _adv_mean_std(rewards, group_size, 1e-6, unbiased=True, scale=grpo_norm_by_std)
    a = adv[:, None].expand_as(logp)
    log_r = _zero_pad(logp - old_logp, mask).clamp(-20.0, 20.0)
    r = torch.exp(log_r)
    pg = -torch.minimum(r * a, r.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high) * a)
    if loss_reduction == "token_mean":
        pg_loss = _token_mean(pg, mask)
    elif loss_reduction == "sequence_mean":
        pg_loss = _seq_mean_token_mean(pg, mask)
    elif loss_reduction == "seq_mean_token_sum_norm":
        pg_loss = _zero_pad(pg, mask).sum() / (logp.shape[0] * (max_seq_len or logp.shape[1]))
    else:
        raise ValueError(loss_reduction)
    loss = pg_loss + beta * _seq_mean_token_mean(kl, mask)
    return {"per_token_kl": _sg(kl), "loss": loss}


# ----------------------------------------------------------------------------------------------------------------
# DeepSeek-V3.2 (tech report arXiv 2512.02556 §3.1)
# ----------------------------------------------------------------------------------------------------------------


@_sanitized
def oracle_deepseek_v32(
    logp, old_logp, ref_logp, mask, rewards, group_size, beta, clip_eps: float = 0.2, scale_by_std: bool = False,
):
    """DeepSeek-V3.2 GRPO: 'unbiased KL estimate' D_t = rho_t * k3_t, rho_t = pi_theta / pi_old differentiable (no
    clamp); advantage without std normalisation A_i = R_i - mean_g R (secondary sources: UNCONFIRMED); GRPO's
    1/G sum_i 1/|o_i| sum_t aggregation (DeepSeekMath form; UNCONFIRMED for V3.2); PPO clip eps (value not given,
    0.2 here). Off-policy sequence masking, keep-routing and keep-sampling-mask are not modelled.
    """
    rho = torch.exp(_zero_pad(logp - old_logp, mask))
    kl = _zero_pad(rho * _estimate(logp - ref_logp, "k3"), mask)
    adv = _adv_mean_std(rewards, group_size, 1e-6, unbiased=True, scale=scale_by_std)
    pg = _ppo_token(logp, old_logp, adv[:, None].expand_as(logp), mask, clip_eps, clip_eps)
    loss = _seq_mean_token_mean(pg + beta * kl, mask)
    return {"per_token_kl": _sg(kl), "loss": loss}


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------

Oracle = Callable[..., dict]

ORACLES: dict[str, Oracle] = {
    "verl_grpo_kl_loss": oracle_verl_grpo_kl_loss,
    "verl_kl_in_reward": oracle_verl_kl_in_reward,
    "verl_k3plus": oracle_verl_k3plus,
    "trl_grpo": oracle_trl_grpo,
    "trl_grpo_bias_corrected": oracle_trl_grpo_bias_corrected,
    "trl_rloo": oracle_trl_rloo,
    "openrlhf_kl_reward": oracle_openrlhf_kl_reward,
    "openrlhf_kl_loss": oracle_openrlhf_kl_loss,
    "openrlhf_unbiased": oracle_openrlhf_unbiased,
    "open_instruct_k3": oracle_open_instruct_k3,
    "open_instruct_is_k1": oracle_open_instruct_is_k1,
    "slime_kl_loss": oracle_slime_kl_loss,
    "slime_unbiased_kl": oracle_slime_unbiased_kl,
    "nemo_rl_default": oracle_nemo_rl_default,
    "nemo_rl_grpo_kl_in_reward": oracle_nemo_rl_grpo_kl_in_reward,
    "skyrl_default": oracle_skyrl_default,
    "deepseek_v32": oracle_deepseek_v32,
}

# The framework's own default KL coefficient for each preset (the oracle takes beta explicitly). Where the framework
# default is 0 (KL off) or unknown, the preset picks a runnable value (or keeps klrl's) and its YAML says so.
DEFAULT_BETA: dict[str, float] = {
    "verl_grpo_kl_loss": 0.001, "verl_kl_in_reward": 0.001, "verl_k3plus": 0.001,
    "trl_grpo": 0.04,  # GRPOConfig default is 0.0 (KL off); 0.04 = TRL's earlier default (UNCONFIRMED which release)
    "trl_grpo_bias_corrected": 0.04, "trl_rloo": 0.05,
    "openrlhf_kl_reward": 0.01, "openrlhf_kl_loss": 0.01, "openrlhf_unbiased": 0.01,
    "open_instruct_k3": 0.05, "open_instruct_is_k1": 0.05,
    "slime_kl_loss": 0.0, "slime_unbiased_kl": 0.0,  # slime default --kl-loss-coef 0: must be set by the user
    "nemo_rl_default": 0.01, "nemo_rl_grpo_kl_in_reward": 0.01, "skyrl_default": 0.001,
    "deepseek_v32": 0.0,  # not published; the preset keeps klrl's beta
}

__all__ = ["ORACLES", "DEFAULT_BETA"] + [f.__name__ for f in ORACLES.values()]
