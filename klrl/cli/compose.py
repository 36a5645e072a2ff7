"""Composing `klrl train` configs, with every error in one line, before Hydra creates anything.

Hydra's own errors are several lines long and name no valid choices; here every bad input (a group option, a key,
a value, a `hydra.*` setting) becomes one line, `klrl: <what> is not valid; choose from: ...`, and exit 2, with no
run directory left behind. `register_configs` puts the schemas into Hydra's ConfigStore; every composing path calls
it (it is idempotent), so an estimator registered at run time is a config choice too.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from contextlib import contextmanager
from functools import lru_cache

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode

from klrl.config.constraints import unwritable
from klrl.config.schema import EstimatorConfig, TrainConfig
from klrl.config.validate import accepts, unknown_key, validate
from klrl.core.estimators import ESTIMATORS
from klrl.errors import ConfigError
from klrl.paths import CONF_DIR
from klrl.runs.rundir import check_nesting

# Flags that print help and run nothing; Hydra flags klrl does not take (it composes conf/train.yaml, always).
HELP_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}
UNSUPPORTED = {"config_path": "--config-path", "config_name": "--config-name", "config_dir": "--config-dir",
               "experimental_rerun": "--experimental-rerun"}
SCHEMA = "_schema"  # model/tiny_schema, task/arith_schema, ...: the structured configs the YAML files fill


def register_configs() -> None:
    """The schemas into Hydra's ConfigStore (idempotent).

    - every registered estimator is an option of the `estimator` group (`estimator=k3+`): adding one takes one
      function in klrl.core.estimators, no YAML;
    - each model source and task brings its own schema (`schema`), stored as `<group>/<name>_schema` for its YAML to
      list first in its defaults. Schemas are not choices: the store's listings (`--help`, error messages, glob
      sweeps) leave them out, and `compose` refuses them."""
    from klrl.models.registry import SOURCES
    from klrl.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, source in SOURCES.items():
        cs.store(group="model", name=f"{name}{SCHEMA}", node=source.schema)
    for name, task in TASKS.items():
        cs.store(group="task", name=f"{name}{SCHEMA}", node=task.schema)
    for name in ESTIMATORS:
        cs.store(group="estimator", name=name, node=EstimatorConfig(name=name))
    if not getattr(cs, "klrl_hides_schemas", False):
        listing = cs.list
        cs.list = lambda path: [n for n in listing(path) if not n.removesuffix(".yaml").endswith(SCHEMA)]
        cs.klrl_hides_schemas = True


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
    return [o for o in loader.get_group_options(group) if not o.endswith(SCHEMA)]


def explain(err: Exception, overrides: list[str] = ()) -> str:
    """One line for a Hydra/OmegaConf composition error (needs Hydra initialised, for the group options)."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not valid; choose from: {', '.join(group_options(group))}"
    if isinstance(err, OverrideParseException):
        return f"{err.override!r} is not a valid override ({err.message.splitlines()[0]}); write key=value"
    why = unselected(overrides)
    if why:
        return why
    cause = err.__cause__ or err
    full_key = getattr(cause, "full_key", None)
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    source = None
    if lines and lines[0].endswith(":") and len(lines) > 1:  # "In 'experiment/x': ConfigKeyError raised ...:"
        source = re.match(r"In '([^']+)/([^'/]+)':", lines[0])  # the group option whose keys failed to merge
        lines = lines[1:]  # Hydra wraps the real error, uncaused, on the lines after its own
        full_key = full_key or next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    text = lines[0] if lines else type(cause).__name__
    m = re.match(r"Could not override '([^']+)'", text) or re.match(r"Key '([^']+)' (?:is )?not in", text)
    if m and source:  # e.g. experiment=smollm2_arith (sets task.prompt) with task=countdown (has no prompt)
        group, option = source.groups()
        key = full_key or m.group(1)
        why = suggest(key, [o for o in overrides if _key(o) != group.replace("/", ".")])
        return (f"{group}={option} sets {key!r}, which the other choices do not have ({why}); choose the groups it "
                f"was written for, or another {group}")
    if m:
        return str(suggest(full_key or m.group(1), overrides))
    m = re.match(r"Value '(.*?)' (?:of type '\w+' )?could not be converted to \w+", text)
    if m and full_key and (what := field_accepts(full_key)):  # OmegaConf's wording names no valid range
        return f"{full_key}={m.group(1)} is not valid; {what}"
    if full_key:
        return f"{full_key}: {text}"
    return text


def field_accepts(key: str) -> str | None:
    """What the config field at dotted `key` accepts, in words: from TrainConfig, or for model.* and task.* keys
    from the schema of the model source or task that declares the field."""
    what = accepts(key, TrainConfig)
    group, _, rest = key.partition(".")
    if what is None and group in ("model", "task"):
        from klrl.models.registry import SOURCES
        from klrl.tasks import TASKS

        for owner in (SOURCES if group == "model" else TASKS).values():
            what = accepts(rest, owner.schema)
            if what:
                break
    return what


def _unselected_candidates(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(override, group, option) of each override that sets a key inside a group's option, `logger.wandb.project=x`
    (the options of some groups, such as logger, are blocks of keys named after them)."""
    loader = GlobalHydra.instance().config_loader()
    out = []
    for o in overrides:
        parts = _key(o).split(".")
        for i in range(1, len(parts) - 1):  # logger.wandb.project: group logger, option wandb
            group = "/".join(parts[:i])
            if loader.get_group_options(group) and parts[i] in group_options(group):
                out.append((o, group, parts[i]))
                break
    return out


def unselected(overrides: list[str]) -> str | None:
    """One line for a key set under a group's option that is not chosen (`logger.wandb.project=x` while only
    logger=tensorboard is): Hydra's own error names neither the key nor the fix. None when no override is one."""
    found = _unselected_candidates(overrides)
    if not found:
        return None
    rest = [o for o in overrides if o not in {f[0] for f in found}]
    try:
        cfg = hydra_compose(config_name="train", overrides=rest)
    except Exception:  # noqa: BLE001 (another bad override: the caller's plain message)
        return None
    for override, group, option in found:
        node = OmegaConf.select(cfg, group.replace("/", "."), default=None)
        if not isinstance(node, DictConfig) or option not in node or node[option] is not None:
            continue
        options = group_options(group)
        chosen = [k for k in node.keys() if k in options and node[k] is not None]
        fix = f"{group}=[{','.join([*chosen, option])}]"
        given = [o for o in rest if _key(o) == group]
        how = f"replace {given[-1]} with {fix}" if given else f"add {fix}"
        return f"{override}: the {option} {group} is not selected; {how} (choices: {', '.join(options)})"
    return None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def suggest(key: str, overrides: list[str]) -> ConfigError:
    """`key` is not in the config the other overrides compose: name the closest keys beside it."""
    rest = [o for o in overrides if _key(o) != key and not _key(o).startswith(f"{key}.")]  # it, and keys below it
    try:
        cfg = hydra_compose(config_name="train", overrides=rest, return_hydra_config=True)
    except Exception:  # noqa: BLE001 (another bad override: the plain message)
        return ConfigError(f"unknown key {key!r} (`klrl train --cfg job` lists the valid keys)")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return ConfigError(f"unknown key {key!r}: {'.'.join(parts[:i])} is a value, not a group of keys")
        if part not in node:
            return unknown_key(".".join(parts[: i + 1]), sorted(str(k) for k in node.keys()))
        node = node._get_node(part)
    return ConfigError(f"unknown key {key!r}")


@lru_cache(maxsize=1)
def _optional_groups() -> frozenset:
    """Groups conf/train.yaml leaves unset (`experiment: null`): the only ones `group=null` may unset."""
    defaults = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/train.yaml")).get("defaults", [])
    return frozenset(k for d in defaults if isinstance(d, dict) for k, v in d.items() if v is None)


LIST_GROUPS = ("logger",)  # groups whose defaults entry in conf/train.yaml is a list: several at once


def check_choices(parsed: list) -> None:
    """Every group choice on the command line is an option of its group (a schema is not); a group every run needs
    is neither removed (`~model`) nor unset (`model=null`)."""
    loader = GlobalHydra.instance().config_loader()
    for o in parsed:
        group = o.key_or_group
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line!r} sweeps several values; `klrl train -m` runs one job for each")
        if o.package or not loader.get_group_options(group):
            continue
        options = group_options(group)
        if group not in _optional_groups() and (o.is_delete() or o.value() is None):
            raise ConfigError(f"{o.input_line!r} leaves no {group}; choose from: {', '.join(options)}")
        value = o.value()
        if isinstance(value, list) and group not in LIST_GROUPS:  # Hydra would keep the last and drop the rest
            raise ConfigError(f"{o.input_line!r}: {group} takes one option, not a list (choose from: "
                              f"{', '.join(options)}); to run each, use `klrl train -m {group}={','.join(map(str, value))}`")
        for v in value if isinstance(value, list) else [value]:
            if v is not None and str(v) not in options:
                raise ConfigError(f"{group}={str(v)!r} is not valid; choose from: {', '.join(options)}")


def check_additions(cfg: DictConfig, parsed: list) -> None:
    """`+hydra.key=value` adds only keys Hydra's schemas have (klrl's own keys are the validator's): Hydra keeps
    any other silently. Free-form parts (hydra.job_logging, hydra.job.env_set) have no schema and take any key."""
    for o in parsed:
        if not (o.is_add() or o.is_force_add()) or not o.key_or_group.startswith("hydra."):
            continue
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False)
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
        if names is not None and leaf not in names:
            raise unknown_key(o.key_or_group, sorted(n for n in names if n != "defaults"))


def check_types(cfg: DictConfig, parsed: list) -> None:
    """What Hydra would coerce, refused: a boolean is `true` or `false` (not 2, `yes` or `on`)."""
    for o in parsed:
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        if o.is_delete() or (not parent_key and leaf not in cfg):
            continue
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        node = parent._get_node(leaf) if isinstance(parent, DictConfig) and leaf in parent else None
        if isinstance(node, BooleanNode) and o.value() is not None and not isinstance(o.value(), bool):
            raise ConfigError(f"{o.key_or_group}={o.get_value_element_as_str()} is not valid; it must be true or "
                              "false")


def compose(overrides: list[str], hydra: bool = False, check: bool = True) -> DictConfig:
    """The validated config of one run (with `hydra` too when asked); ConfigError, one line, on any bad input."""
    with hydra_context():
        try:
            parsed = OverridesParser.create().parse_overrides(list(overrides))
            check_choices(parsed)
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
            check_types(cfg, parsed)
            check_additions(cfg, parsed)
        except ConfigError:
            raise
        except Exception as e:  # Hydra's own multi-line errors; explain() needs Hydra still initialised
            raise ConfigError(explain(e, list(overrides))) from None
    if check:
        validate(cfg)
    return cfg


def _parser(args: list[str] = ()) -> argparse.ArgumentParser:
    from klrl.hydra_private import get_args_parser  # Hydra's own command line: the flags klrl train takes

    parser = get_args_parser()

    def error(message: str):  # argparse prints usage and a message over several lines; klrl's is one
        raise ConfigError(f"train: {message}{_as_override(message, list(args))}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _as_override(message: str, args: list[str]) -> str:
    """For `--steps 10` or `--steps=10` among argparse's unrecognized arguments: the override that was meant."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    for i, a in enumerate(args):
        if a.startswith("--") and len(a) > 2 and a in message:
            key, eq, value = a[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                value = args[i + 1]
            return f"; overrides are written key=value: {key}={value or '...'}"
    return ""


def parse_args(args: list[str]) -> argparse.Namespace:
    """`klrl train`'s command line by Hydra's parser (flags and overrides in any order); ConfigError, one line,
    for what Hydra would refuse in several, and for Hydra flags klrl does not take."""
    ns = _parser(args).parse_intermixed_args(args)
    for dest, name in UNSUPPORTED.items():
        if getattr(ns, dest):
            raise ConfigError(f"{name} is not valid with klrl train, which composes conf/train.yaml; choose groups "
                              "and keys with overrides (experiment=... for a whole setup)")
    if ns.run + bool(ns.cfg) + ns.multirun + (ns.info is not None) > 1:
        raise ConfigError("choose one of --run, --multirun (-m), --cfg and --info")
    return ns


def canonical(ns: argparse.Namespace) -> list[str]:
    """The arguments again, flags first: Hydra's parser takes no flag after an override."""
    flags = ["--help"] * ns.help + ["--hydra-help"] * ns.hydra_help + ["-sc"] * ns.shell_completion
    flags += ["-m"] * ns.multirun + ["-r"] * ns.run + ["--resolve"] * ns.resolve
    flags += ["--cfg", ns.cfg] * bool(ns.cfg) + ["--package", ns.package] * bool(ns.package)
    flags += ["--info", ns.info] * (ns.info is not None)
    return [*flags, *ns.overrides]


def split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """-> (overrides, multirun, help_only)."""
    if any(a.split("=")[0] in HELP_FLAGS for a in args):
        return [a for a in args if not a.startswith("-")], "-m" in args or "--multirun" in args, True
    ns = parse_args(args)
    return list(ns.overrides), ns.multirun, False


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every run a (multirun) command line expands to, by Hydra's own parser and sweeper rules."""
    from klrl.hydra_private import split_arguments  # no public API expands a sweep

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parsed = OverridesParser.create(loader).parse_overrides(overrides)  # glob(...) lists a group's options
    if not multirun:
        return [overrides]
    hydra = [o.input_line for o in parsed if o.is_hydra_override()]
    jobs = [o for o in parsed if not o.is_hydra_override()]
    return [[*hydra, *job] for batch in split_arguments(jobs) for job in batch]


def output_dir(key: str, value: str) -> None:
    """A directory runs will be written to (hydra.run.dir, hydra.sweep.dir): ConfigError unless it can be."""
    check_nesting(key, value, "run" if key == "hydra.run.dir" else "sweep")  # reads only: before the probe
    why = unwritable(value, "dir")
    if why:
        raise ConfigError(f"{key}={value!r} is not valid ({why}); give a directory klrl can create and write")


def distinct_runs(jobs: list[list[str]], configs: list[DictConfig]) -> list[str]:
    """Each run's directory under the sweep dir (hydra.sweep.subdir); ConfigError when two runs would share one.
    A subdir named by the job number (`${hydra.job.num}`) is only known at launch, and always distinct."""
    subdirs: dict[str, list[str]] = {}
    for job, cfg in zip(jobs, configs):
        try:
            subdir = str(cfg.hydra.sweep.subdir)
        except OmegaConfBaseException:
            return []
        if subdir in subdirs:
            first, second = (" ".join(j) or "(defaults)" for j in (subdirs[subdir], job))
            raise ConfigError(f"runs [{first}] and [{second}] would share the run directory {subdir!r}; make them "
                              "differ in a key that names run directories")
        subdirs[subdir] = job
    return list(subdirs)


def preflight(args: list[str]) -> list[DictConfig]:
    """Compose and validate every run a `klrl train` command would start, and the sweep directory of a multirun;
    ConfigError (one line) on the first bad one. Returns the configs (with their `hydra` node)."""
    overrides, multirun, help_only = split_args(args)
    if help_only:
        if not any(a in ("--version", "--shell-completion", "-sc") for a in args):
            compose(overrides, check=False)  # the help shows this config: the same one-line errors
        return []
    with hydra_context():  # glob(...) sweeps list a group's options
        try:
            jobs = expand(overrides, multirun)
        except Exception as e:  # override syntax
            raise ConfigError(explain(e, overrides)) from None
    configs = [compose(job, hydra=True) for job in jobs]
    package = parse_args(args).package
    if package and OmegaConf.select(configs[0], package, default=None) is None:
        raise ConfigError(f"--package {package!r} is not a part of the config; give a key path, e.g. --package optim")
    if multirun:
        for sweep_dir in sorted({str(c.hydra.sweep.dir) for c in configs}):
            output_dir("hydra.sweep.dir", sweep_dir)
        distinct_runs(jobs, configs)
    return configs


# Groups whose every key shapes the KL term's gradient; of the others a preset pins only the keys its YAML sets.
KL_GROUPS = ("estimator", "placement")


def preset_departures(cfg: DictConfig) -> list[str]:
    """Where a config made with `preset=NAME` no longer has the framework's setting: `key: preset's -> this` for a
    changed group option (placement: 'loss' -> 'reward'), any estimator or placement key, and the other keys the
    preset's YAML sets. beta is the user's to tune and not compared. [] without a preset."""
    from klrl.runs.rundir import config_diff

    name = OmegaConf.select(cfg, "preset.name", default=None)
    if not name:
        return []
    groups, own, ref = _preset_reference(name)
    mine = OmegaConf.to_container(cfg, resolve=True)
    out = []
    for root in sorted(groups | set(own)):
        a, b = ref.get(root), mine.get(root)
        if root not in KL_GROUPS and isinstance(a, dict) and isinstance(b, dict):
            # e.g. algo: its option and what the preset sets (agg, adv_eps), not the batch shape
            keys = ["name"] * (root in groups) + list(own.get(root) or {})
            a, b = ({k: d.get(k) for k in keys} for d in (a, b))
        out += config_diff({root: a}, {root: b})  # a changed option is one entry (config_diff)
    return out


@lru_cache(maxsize=None)
def _preset_reference(name: str) -> tuple[frozenset, dict, dict]:
    """A preset's overridden groups, the keys its YAML sets (beta and its metadata aside), and the config it
    composes to alone."""
    own = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/preset/{name}.yaml"))
    groups = frozenset(key.rsplit("/", 1)[-1] for entry in own.pop("defaults", []) for key in entry)
    for meta in ("preset", "beta"):
        own.pop(meta, None)
    return groups, own, OmegaConf.to_container(compose([f"preset={name}"], check=False), resolve=True)


def preset_warning(cfg: DictConfig) -> str | None:
    """One line for a preset the config departs from (`preset_departures`), or None."""
    changed = preset_departures(cfg)
    if not changed:
        return None
    p = cfg.preset
    return (f"preset={p.name} with changes ({'; '.join(changed)}): not {p.framework}'s setting any more, and maybe "
            "not its gradient; `klrl audit` with the same overrides gives the gradient this config trains with")
