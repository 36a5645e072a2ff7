"""Composing `klrl train` configs, with every error in one line, before Hydra creates anything.

Hydra's own errors are several lines long and name no valid choices; here every bad input (a group option, a key,
a value, a `hydra.*` setting) becomes one line, `klrl: <what> is not valid; choose from: ...`, and exit 2, with no
run directory left behind. `register_configs` puts the schemas into Hydra's ConfigStore; every composing path calls
it (it is idempotent), so an estimator registered at run time is a config choice too.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from klrl.config.schema import EstimatorConfig, TrainConfig
from klrl.config.validate import validate
from klrl.core.estimators import ESTIMATORS
from klrl.errors import ConfigError
from klrl.paths import CONF_DIR

# Hydra flags that take a value; flags that print help and run nothing (everything else is composed and checked).
VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
HELP_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def register_configs() -> None:
    """The schemas into Hydra's ConfigStore (idempotent).

    - every registered estimator is an option of the `estimator` group (`estimator=k3+`): adding one takes one
      function in klrl.core.estimators, no YAML;
    - each model source and task brings its own schema (`schema`), stored as `<group>/<name>_schema` for its YAML to
      list first in its defaults."""
    from klrl.models.registry import SOURCES
    from klrl.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, source in SOURCES.items():
        cs.store(group="model", name=f"{name}_schema", node=source.schema)
    for name, task in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=task.schema)
    for name in ESTIMATORS:
        cs.store(group="estimator", name=name, node=EstimatorConfig(name=name))


@contextmanager
def hydra_context():
    """Hydra initialised on klrl's conf/ (re-entrant: inside a running Hydra app the global one is reused)."""
    register_configs()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def group_options(group: str) -> list[str]:
    """The options of a config group a user may choose (schema entries are not choices)."""
    loader = GlobalHydra.instance().config_loader()
    return [o for o in loader.get_group_options(group) if not o.endswith("_schema")]


def explain(err: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error (needs Hydra initialised, for the group options)."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not valid; choose from: {', '.join(group_options(group))}"
    cause = err.__cause__ or err
    full_key = getattr(cause, "full_key", None)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    m = re.match(r"Could not override '([^']+)'", text) or re.match(r"Key '([^']+)' (?:is )?not in", text)
    if m:
        key = full_key or m.group(1)
        return f"unknown key {key!r} (`klrl train --cfg job` lists the valid keys)"
    if full_key:
        return f"{full_key}: {text}"
    return text


def compose(overrides: list[str], hydra: bool = False, check: bool = True) -> DictConfig:
    """The validated config of one run (with `hydra` too when asked); ConfigError, one line, on any bad input."""
    with hydra_context():
        try:
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
        except ConfigError:
            raise
        except Exception as e:  # Hydra's own multi-line errors; explain() needs Hydra still initialised
            raise ConfigError(explain(e)) from None
    if check:
        validate(cfg)
    return cfg


def split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """-> (overrides, multirun, help_only). An override is `key=value` or `~key`; flags' values (`--cfg job`,
    `--info defaults`) have neither form."""
    overrides, multirun, help_only = [], False, False
    it = iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in VALUE_FLAGS:
            next(it, None)
        elif a.split("=")[0] in HELP_FLAGS:
            help_only = True
        elif not a.startswith("-") and ("=" in a or a.startswith("~")):
            overrides.append(a)
    return overrides, multirun, help_only


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every run a (multirun) command line expands to, by Hydra's own parser and sweeper rules."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # no public API expands a sweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        return [overrides]
    hydra = [o.input_line for o in parsed if o.is_hydra_override()]
    jobs = [o for o in parsed if not o.is_hydra_override()]
    return [[*hydra, *job] for batch in BasicSweeper.split_arguments(jobs, None) for job in batch]


def preflight(args: list[str]) -> list[DictConfig]:
    """Compose and validate every run a `klrl train` command would start; ConfigError (one line) on the first bad
    one. Returns the configs (with their `hydra` node)."""
    overrides, multirun, help_only = split_args(args)
    if help_only:
        return []
    try:
        jobs = expand(overrides, multirun)
    except Exception as e:  # override syntax
        with hydra_context():
            raise ConfigError(explain(e)) from None
    return [compose(job, hydra=True) for job in jobs]
