"""Compose and validate every run of a `klrl train` command before Hydra creates anything.

Hydra's own errors are several lines long and name no valid choices for values; here every bad input becomes one
line, `klrl: <what> is not valid; choose from: ...`, and a non-zero exit, with no run directory left behind.
"""

from __future__ import annotations

import re

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException

from klrl.config.schema import ConfigError, register_configs, validate

# Hydra flags that take a value, and flags after which we leave everything to Hydra.
VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
PASS_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
              "--resolve", "-p", "--package"}


def split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """-> (overrides, multirun, leave_to_hydra)."""
    overrides, multirun, skip = [], False, False
    it = iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in VALUE_FLAGS:
            next(it, None)
        elif a.split("=")[0] in PASS_FLAGS:
            skip = True
        elif not a.startswith("-"):
            overrides.append(a)
    return overrides, multirun, skip


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        return [overrides]
    jobs = [o for o in parsed if not o.is_hydra_override()]
    return [job for batch in BasicSweeper.split_arguments(jobs, None) for job in batch]


def _group_options(group: str) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    return [o for o in loader.get_group_options(group) if not o.endswith("_schema")]


def explain(err: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not valid; choose from: {', '.join(_group_options(group))}"
    cause = err.__cause__ or err
    full_key = getattr(cause, "full_key", None)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        return f"unknown key '{m.group(1)}' (see `klrl train --cfg job` for the valid keys)"
    if full_key:
        return f"{full_key}: {text}"
    return text


def preflight(args: list[str], conf_dir: str) -> None:
    """Raise ConfigError (one line) if any run the command would start is invalid."""
    overrides, multirun, skip = split_args(args)
    if skip:
        return
    register_configs()
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        jobs = expand(job_overrides, multirun)
    except Exception as e:  # override syntax
        raise ConfigError(explain(e)) from None
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        for job in jobs:
            try:
                cfg = compose(config_name="train", overrides=job)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(explain(e)) from None
            validate(cfg)
