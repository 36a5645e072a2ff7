"""Every KL configuration klrl can train, named, and built through the trainer's own `kl_spec`.

A configuration is estimator x placement x form x importance weighting, restricted to the combinations
`klrl.config.schema.validate` accepts: reward_form and the sequence weight only where the KL is in the reward (the weight
with the seqsum form only), the token weight only where it is in the loss. Names read
`<estimator>-<placement>[+togo][+seqIS][+tokIS]`, e.g. `k3-both+togo+tokIS`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from omegaconf import OmegaConf

from klrl.config.specs import kl_spec
from klrl.core.estimators import ESTIMATORS
from klrl.core.losses import KLSpec

REWARD_VARIANTS = (("seqsum", False), ("togo", False), ("seqsum", True))  # (reward_form, reward_is_weight)


@dataclass(frozen=True)
class AuditConfig:
    name: str
    estimator: str
    placement: str  # reward | loss | both
    reward_form: str | None
    reward_is_weight: bool
    loss_is_weight: bool
    spec: KLSpec

    @property
    def overrides(self) -> str:
        """The `klrl train` command-line overrides that select this configuration."""
        out = [f"estimator={self.estimator}", f"placement={self.placement}"]
        if self.reward_form == "togo":
            out.append("placement.reward_form=togo")
        if self.reward_is_weight:
            out.append("placement.reward_is_weight=true")
        if self.loss_is_weight:
            out.append("placement.loss_is_weight=true")
        return " ".join(out)


def config_name(est: str, placement: str, form: str | None, r_is: bool, l_is: bool) -> str:
    suffix = ("+togo" if form == "togo" else "") + ("+seqIS" if r_is else "") + ("+tokIS" if l_is else "")
    return f"{est}-{placement}{suffix}"


def _make(est: str, placement: str, form: str | None, r_is: bool, l_is: bool, beta: float,
          clamps: tuple[float | None, float | None] = (None, None)) -> AuditConfig:
    # Through kl_spec, so that the audit cannot drift from what `klrl train` builds from the same choices.
    cfg = OmegaConf.create({
        "beta": beta,
        "estimator": {"name": est, "clamp_log_ratio": clamps[0], "clamp_value": clamps[1]},
        "placement": {"name": placement, "reward_form": form, "reward_is_weight": r_is, "loss_is_weight": l_is},
    })
    return AuditConfig(config_name(est, placement, form, r_is, l_is), est, placement, form, r_is, l_is, kl_spec(cfg))


def all_configs(beta: float = 1.0, clamps: tuple[float | None, float | None] = (None, None)) -> list[AuditConfig]:
    """Every configuration of every registered estimator: 3 reward forms, 2 loss forms, 3 x 2 combined (11 each)."""
    out = []
    for est in ESTIMATORS:
        out += [_make(est, "reward", f, r, False, beta, clamps) for f, r in REWARD_VARIANTS]
        out += [_make(est, "loss", None, False, l, beta, clamps) for l in (False, True)]
        out += [_make(est, "both", f, r, l, beta, clamps) for f, r in REWARD_VARIANTS for l in (False, True)]
    return out


def _knob_suffix(spec: KLSpec) -> str:
    """The framework presets' knobs in a configuration's name (`+score`, `+clampW`, `+oldR`, `+kl:token_mean`)."""
    out = f"+{spec.loss_weight}" if spec.loss_weight != "none" else ""
    out += ("+clampW" if spec.clamp_after_weight else "") + ("+oldR" if spec.reward_from_old else "")
    return out + (f"+kl:{spec.loss_agg}" if spec.loss_agg else "")


def from_config(cfg) -> AuditConfig:
    """The KL configuration a composed `klrl train` config selects, named with every knob it sets (and with the
    framework preset's name when `preset=` chose it)."""
    p = cfg.placement
    form = p.get("reward_form") or ("seqsum" if p.name in ("reward", "both") else None)
    spec = kl_spec(cfg)
    name = config_name(cfg.estimator.name, p.name, form, bool(p.get("reward_is_weight")),
                       bool(p.get("loss_is_weight"))) + _knob_suffix(spec)
    preset = (cfg.get("preset") or {}).get("name")
    if preset:  # a framework's setting (conf/preset/): its name first, then what it selects
        name = f"{preset} ({name})"
    return AuditConfig(name, cfg.estimator.name, p.name, form, bool(p.get("reward_is_weight")),
                       bool(p.get("loss_is_weight")), spec)


def select(patterns: list[str] | None, beta: float = 1.0,
           clamps: tuple[float | None, float | None] = (None, None)) -> list[AuditConfig]:
    """Configurations matching any of the glob patterns (all if none). ValueError names an unmatched pattern."""
    configs = all_configs(beta, clamps)
    if not patterns:
        return configs
    chosen = []
    for pat in patterns:
        hits = [c for c in configs if fnmatch.fnmatchcase(c.name, pat)]
        if not hits:
            raise ValueError(
                f"unknown configuration {pat!r}; choose from: {', '.join(c.name for c in configs)} "
                "(globs such as 'k3-*' work)"
            )
        chosen += [c for c in hits if c not in chosen]
    return [c for c in configs if c in chosen]
