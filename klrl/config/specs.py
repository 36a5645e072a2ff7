"""From a config to what the loss and the sampler need: the KL spec, the policy-gradient spec, the sampling."""

from __future__ import annotations

from omegaconf import DictConfig

from klrl.core.distributions import Sampling
from klrl.core.losses import KLSpec, PGSpec

PLACEMENTS = {"none": (False, False), "reward": (True, False), "loss": (False, True), "both": (True, True)}


def kl_spec(cfg: DictConfig) -> KLSpec:
    """The KL part of the loss, from a validated config (or a run's stored one)."""
    in_reward, in_loss = PLACEMENTS[cfg.placement.name]
    p = cfg.placement
    return KLSpec(
        estimator=None if cfg.estimator.name == "none" else cfg.estimator.name,
        beta=float(cfg.beta),
        in_reward=in_reward,
        reward_form=p.get("reward_form") or "seqsum",
        reward_is_weight=bool(p.get("reward_is_weight")),
        in_loss=in_loss,
        loss_is_weight=bool(p.get("loss_is_weight")),
        clamp_log_ratio=cfg.estimator.get("clamp_log_ratio"),
        clamp_value=cfg.estimator.get("clamp_value"),
        loss_weight=p.get("loss_weight") or "none",
        clamp_after_weight=bool(cfg.estimator.get("clamp_after_weight")),
        reward_from_old=p.get("reward_logp") == "old",
        loss_agg=p.get("loss_agg"),
    )


def pg_spec(cfg: DictConfig, budget: int | None = None) -> PGSpec:
    """The policy-gradient side of the loss. budget: the generation budget that seq_mean_token_sum_norm divides by
    when algo.agg_norm is unset (default task.max_new_tokens; the audit's toy passes its own length)."""
    a = cfg.algo
    norm = None
    if "seq_mean_token_sum_norm" in (a.agg, cfg.placement.get("loss_agg")):
        norm = float(a.get("agg_norm") or (budget if budget is not None else cfg.task.max_new_tokens))
    # .get: the configs of runs made before these knobs existed lack them
    eps = a.get("adv_eps")
    return PGSpec(baseline=a.baseline, agg=a.agg, agg_norm=norm, ratio_clip=a.ratio_clip, is_truncate=a.is_truncate,
                  adv_eps=1e-6 if eps is None else float(eps), adv_std=a.get("adv_std") or "unbiased",
                  dual_clip=a.get("dual_clip"), ratio_log_clamp=a.get("ratio_log_clamp"))


def sampling_spec(cfg: DictConfig) -> Sampling:
    """How training samples (and so which distribution it trains): generation.temperature / top_p."""
    g = cfg.get("generation") or {}
    return Sampling(float(g.get("temperature", 1.0)), float(g.get("top_p", 1.0)))


def is_off_policy(cfg) -> bool:
    """Whether a run's loss sees samples from a policy other than the current one (lag, several updates)."""
    algo = cfg.get("algo") or {}
    return int(algo.get("updates_per_batch") or 1) > 1 or int(cfg.get("async_level") or 0) > 0
