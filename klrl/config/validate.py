"""The one validator: every declared field constraint, unknown keys, each schema's own check hook, then the rules
that tie fields together. Cheap (touches no model and no data) and run before anything is built or written, for
`klrl train`, every point of a sweep, `klrl audit` and `klrl eval`. Every failure is one line naming the key, the
bad value and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from klrl.config.constraints import APPLIES, CHECKS, OneOf
from klrl.config.specs import is_off_policy
from klrl.errors import ConfigError

MISSING = "???"


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value)


def _what(checks: tuple, kind: Any = None) -> str:
    """What a field accepts, in words: its first declared constraint, or its type."""
    if checks:
        c = checks[0]
        if isinstance(c, OneOf):  # booleans as the command line writes them (resume=true)
            return f"choose from: {', '.join(str(x).lower() if isinstance(x, bool) else str(x) for x in c.choices)}"
        return f"it must be {c.valid}"
    name = str(getattr(kind, "__name__", kind))
    if name in ("bool", "Optional[bool]"):
        return "it must be true or false"
    if name.endswith("Config"):  # a structured node: a config group or a block of keys
        return "it is a block of keys: override them one by one (block.key=value)"
    return f"it must be of type {name}" if kind is not None else "give it a value"


def accepts(key: str, schema: type) -> str | None:
    """What the field at dotted `key` of the dataclass `schema` accepts, in words; None if it is no such field."""
    import typing

    kind: Any = schema
    field = None
    for part in key.split("."):
        args = [a for a in typing.get_args(kind) if a is not type(None)]  # Optional[X] -> X
        kind = args[0] if len(args) == 1 else kind
        if not dataclasses.is_dataclass(kind):
            return None
        field = next((f for f in dataclasses.fields(kind) if f.name == part), None)
        if field is None:
            return None
        kind = typing.get_type_hints(kind).get(part, field.type)
    return _what(field.metadata.get(CHECKS, ()), kind) if field is not None else None


def _refuse(key: str, value: Any, constraint) -> ConfigError:
    return ConfigError(f"{key}={_show(value)} is not valid; {_what((constraint,))}")


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """`key` is not a key; suggest the closest of `known` (the keys beside it), or list them."""
    where, _, leaf = key.rpartition(".")
    near = difflib.get_close_matches(leaf, known, n=3, cutoff=0.5)
    if near:  # only the ones about as close as the best: 'estimater' means estimator, not resume
        best = difflib.SequenceMatcher(None, leaf, near[0]).ratio()
        near = [n for n in near if difflib.SequenceMatcher(None, leaf, n).ratio() >= best - 0.15]
    if near:
        names = ", ".join(f"{where}.{n}" if where else n for n in near)
        return ConfigError(f"unknown key {key!r}; did you mean {names}?")
    return ConfigError(f"unknown key {key!r}; valid keys at {where or 'the top level'}: {', '.join(known)}")


def _field_value(node: DictConfig, key: str, full: str, f: dataclasses.Field) -> Any:
    """node[key], or ConfigError (one line) when it is unset or cannot be read."""
    if OmegaConf.is_missing(node, key):
        raise ConfigError(f"{full} is not set; {_what(f.metadata.get(CHECKS, ()), f.type)}")
    try:
        return node[key]
    except OmegaConfBaseException as e:  # a broken interpolation
        raise ConfigError(f"{full}: {str(e).splitlines()[0]}") from None


def check_fields(node: DictConfig, root: DictConfig, prefix: str = "", found: dict | None = None) -> None:
    """Walk a structured node: refuse keys its schema lacks and keys it needs that are gone (`~key`), check every
    declared constraint, recurse, and note each schema's `check(node, root)` hook (model sources and tasks know
    things the schema cannot say) and each knob set where it would have no effect (`applies=`); both run once every
    field has passed."""
    top = found is None
    found = {"hooks": [], "applies": []} if top else found
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields and not (key == "hydra" and not prefix):  # Hydra's own node: Hydra checks it
            raise unknown_key(f"{prefix}{key}", sorted(fields))
    present = set(node.keys())  # `key in node` is False for a key whose value is missing (???)
    for key, f in fields.items():
        full = f"{prefix}{key}"
        if key not in present:
            raise ConfigError(f"~{full} removes a key every run needs; set {full} instead "
                              f"({_what(f.metadata.get(CHECKS, ()), f.type)})")
        value = _field_value(node, key, full, f)
        if isinstance(value, DictConfig):
            check_fields(value, root, f"{full}.", found)
            continue
        if value is None:
            continue
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        for constraint in f.metadata.get(CHECKS, ()):
            if not constraint(plain):
                raise _refuse(full, plain, constraint)
        if f.metadata.get(APPLIES) is not None:
            found["applies"].append((full, plain, f.metadata[APPLIES]))
    hook: Callable | None = getattr(schema, "check", None)
    if hook is not None:
        found["hooks"].append((hook, node))
    if top:
        for full, value, applies in found["applies"]:
            if not applies.when(root):
                raise ConfigError(f"{full}={_show(value)} has no effect {applies.here(root)}; it needs {applies.needs}")
        for hook, part in reversed(found["hooks"]):  # the task's data before the model's weights, as a run needs
            hook(part, root)


# --- rules that tie fields together (each raises one line, or passes) ---------------------------------------------


def kl_choices(cfg) -> None:
    beta, est, place = cfg.beta, cfg.estimator.name, cfg.placement.name
    if est == "none":
        if beta != 0:
            preset = OmegaConf.select(cfg, "preset.name", default=None)
            source = f" (preset={preset} sets beta={beta})" if preset else ""
            raise ConfigError(f"beta={beta} with estimator=none would be ignored{source}; set beta=0 or choose an "
                              "estimator")
        if place != "none":
            raise ConfigError(f"placement={place} with estimator=none would be ignored; drop it (placement=none)")
        return
    if place == "none":
        raise ConfigError(f"estimator={est} with placement=none would be ignored; choose reward, loss or both")
    if beta == 0:
        raise ConfigError(f"beta=0 makes estimator={est} inert; use estimator=none for a run without KL")


def placement_options(cfg) -> None:
    p = cfg.placement
    if p.loss_is_weight and p.loss_weight is not None:
        raise ConfigError(f"placement.loss_weight={p.loss_weight} and placement.loss_is_weight=true are alternatives "
                          "(two weights of the in-loss term); set only one")
    if p.reward_is_weight and p.reward_form == "togo":
        raise ConfigError("placement.reward_is_weight=true applies to the seqsum form only; set "
                          "placement.reward_form=seqsum")


def algo_options(cfg) -> None:
    a = cfg.algo
    if a.group_size < 2 and a.baseline != "none":
        raise ConfigError(f"algo.group_size={a.group_size} is too small for baseline {a.baseline}; it needs >= 2")
    if cfg.placement.get("reward_is_weight") and a.group_size < 2:
        raise ConfigError(f"algo.group_size={a.group_size}: placement.reward_is_weight needs >= 2 (leave-one-out)")
    if a.ratio_clip is not None and a.is_truncate is not None:
        raise ConfigError("algo.ratio_clip and algo.is_truncate are alternatives; set only one")
    off_policy = is_off_policy(cfg)
    if off_policy and a.ratio_clip is None and a.is_truncate is None:
        if cfg.async_level:
            raise ConfigError(f"async_level={cfg.async_level} makes rollouts off-policy: set algo.is_truncate (the paper "
                              "uses 8) or algo.ratio_clip")
        raise ConfigError(f"algo.updates_per_batch={a.updates_per_batch} needs algo.ratio_clip (PPO) or "
                          "algo.is_truncate: later updates are off-policy")
    if a.micro_batch_size is not None and a.micro_batch_size % a.group_size:
        raise ConfigError(f"algo.micro_batch_size={a.micro_batch_size} must be a multiple of algo.group_size="
                          f"{a.group_size}")


def execution(cfg) -> None:
    m = cfg.model
    if m.param_dtype is not None and m.param_dtype != m.dtype and not m.fsdp:
        raise ConfigError(f"model.param_dtype={m.param_dtype} (master weights apart from model.dtype={m.dtype}) "
                          "needs model.fsdp=true, whose mixed-precision policy casts them; or drop model.param_dtype")
    if cfg.async_mode == "pipeline":
        if cfg.async_level < 1:
            raise ConfigError("async_mode=pipeline needs async_level >= 1 (how far generation may run ahead)")
        if m.fsdp:
            raise ConfigError("model.fsdp=true does not run with async_mode=pipeline (one trainer process); "
                              "use async_mode=sim for lagged rollouts")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible here; use device=auto or device=cpu")


RULES = (kl_choices, placement_options, algo_options, execution)


def validate(cfg: DictConfig) -> None:
    """Refuse bad values, unknown keys and silently inert combinations (ConfigError, one line)."""
    check_fields(cfg, cfg)
    for rule in RULES:
        rule(cfg)
