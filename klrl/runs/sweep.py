"""Named grids (sweeps/NAME.yaml) and `klrl sweep NAME`: one job array per grid, in a sweep directory of its own.

A grid file:

    description: one line
    launcher: slurm                # default hydra/launcher for `klrl sweep NAME` (local if absent)
    overrides: [task=math, ...]    # every run; hydra.* entries configure the launch (resources, ...)
    grid:                          # a UNION of cartesian products, expanded and deduplicated
      - {estimator: [k1, k3], placement: [reward, loss], seed: [0, 1]}
      - {estimator: none, seed: [0, 1]}

A list value is a swept dimension; a scalar is one value, and a scalar string is read as a Hydra override value, so
Hydra's sweep syntax works there too (`seed: range(0,4)`). The command line's overrides are crossed with every
sub-grid and take precedence over it; a grid key may not also appear in `overrides` (which would silently win).

`klrl sweep` expands the grid, validates every point (the same one-line errors as `klrl train`), then runs the Hydra
app in multirun mode with klrl's grid sweeper (which performs the same expansion) and `resume=true`, so submitting the
same command again continues unfinished runs and skips finished ones. The sweep directory is outputs/sweeps/NAME.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klrl.config.schema import ConfigError

from klrl.paths import SWEEPS_DIR

SWEEP_ROOT = Path("outputs") / "sweeps"
GRID_KEYS = ("description", "launcher", "overrides", "grid")
# Characters Hydra's override grammar accepts in an unquoted value (a subset: anything else gets quoted).
_SAFE_VALUE = re.compile(r"^[\w\-./+:@%*?|]+$")

USAGE = """usage: klrl sweep NAME|FILE.yaml [--no-wait] [--list] [OVERRIDE ...]

Launch the grid in sweeps/NAME.yaml (or FILE.yaml) as ONE job array. Sweep dir: outputs/sweeps/NAME (change
with hydra.sweep.dir=...). Every run gets resume=true: running the same command again skips finished runs and
resumes the others from their checkpoints.

  --no-wait   submit, print the sweep dir and the job ids, and return (watch with `klrl status SWEEP_DIR`)
  --list      print the runs the grid expands to, and exit
  OVERRIDE    crossed with every grid point, e.g. steps=2 seed=0,1; or the launch: hydra/launcher=slurm
              hydra.launcher.partition=gpu hydra.launcher.account=myproj

grids: {grids}
"""


@dataclass
class Grid:
    name: str
    path: Path
    description: str = ""
    launcher: str = "local"
    overrides: list[str] = field(default_factory=list)
    subgrids: list[dict[str, Any]] = field(default_factory=list)


def available() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def find_grid(name: str) -> Path:
    """A grid name (sweeps/NAME.yaml) or a path to a grid file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"grid file {name} does not exist")
        return path.resolve()
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep {name!r} is not valid; choose from: {', '.join(available())} (or give a .yaml path)")
    return path


def load_grid(name_or_path: str | Path) -> Grid:
    from omegaconf import OmegaConf

    path = find_grid(str(name_or_path))
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = set(data) - set(GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; choose from: {', '.join(GRID_KEYS)}")
    grid = Grid(name=path.stem, path=path, description=str(data.get("description") or ""),
                launcher=str(data.get("launcher") or "local"), overrides=[str(o) for o in data.get("overrides") or []],
                subgrids=data.get("grid") or [])
    if not isinstance(grid.subgrids, list) or not all(isinstance(s, dict) and s for s in grid.subgrids):
        raise ConfigError(f"{path}: `grid` must be a list of non-empty mappings (key: value or [values])")
    common = {_key(o) for o in grid.overrides}
    for sub in grid.subgrids:
        for key in sub:
            if key.lstrip("+~").startswith("hydra"):
                raise ConfigError(f"{path}: grid key {key!r}: hydra.* settings belong in `overrides`")
            if key.lstrip("+~") in {k.lstrip("+~") for k in common}:
                raise ConfigError(f"{path}: {key!r} is both in `overrides` and in the grid; keep it in one place")
    return grid


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def format_value(value: Any) -> str:
    """One element of a swept list as Hydra override syntax, quoted where the grammar needs it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        raise ConfigError(f"grid value {value!r}: a nested list/mapping is ambiguous; write it as a quoted string")
    text = str(value)
    if _SAFE_VALUE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def subgrid_overrides(sub: dict[str, Any]) -> list[str]:
    out = []
    for key, value in sub.items():
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"grid key {key!r} has an empty list of values")
            out.append(f"{key}={','.join(format_value(v) for v in value)}")
        elif isinstance(value, str):
            out.append(f"{key}={value}")  # verbatim: Hydra sweep syntax such as range(0,4) is allowed
        else:
            out.append(f"{key}={format_value(value)}")
    return out


def expand(subgrids: list[dict[str, Any]], arguments: list[str]) -> list[list[str]]:
    """Union over sub-grids of (sub-grid x arguments), in order, without duplicate points.

    `arguments` are task overrides (Hydra's sweep syntax allowed); where one names a key the sub-grid also sets,
    the argument wins. Two points are the same when their sets of `key=value` overrides are equal.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for sub in subgrids or [{}]:
        try:
            parsed = parser.parse_overrides([*subgrid_overrides(sub), *arguments])
        except Exception as e:  # override syntax; the parser's message is one paragraph
            raise ConfigError(f"grid point {sub}: {str(e).strip().splitlines()[0]}") from None
        hydra_keys = [o.input_line for o in parsed if o.is_hydra_override()]
        if hydra_keys:
            raise ConfigError(f"{', '.join(map(str, hydra_keys))}: hydra settings cannot be grid points")
        for job in itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None)):
            point = tuple(sorted(job))
            if point not in seen:
                seen.add(point)
                jobs.append(list(job))
    return jobs


def split_hydra(overrides: list[str]) -> tuple[list[str], list[str]]:
    """-> (hydra overrides, task overrides), by Hydra's own rule (keys under hydra, or the hydra/ groups)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    hydra_args, task_args = [], []
    for o in overrides:
        try:
            is_hydra = parser.parse_override(o).is_hydra_override()
        except Exception as e:
            raise ConfigError(f"{o}: {str(e).strip().splitlines()[0]}") from None
        (hydra_args if is_hydra else task_args).append(o)
    return hydra_args, task_args


def check_jobs(jobs: list[list[str]], conf_dir: str, hydra_args: list[str] = ()) -> list[str]:
    """Compose and validate every run (with the launch's hydra overrides, so that a launcher key the chosen
    launcher lacks fails here too); returns each run's directory name (hydra.sweep.subdir).

    Raises ConfigError naming the grid point, or two points that would write to the same run directory.
    """
    from hydra import compose, initialize_config_dir

    from klrl.config.schema import validate
    from klrl.cli.compose import explain

    subdirs: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        for job in jobs:
            where = " ".join(job) or "(defaults)"
            try:
                cfg = compose(config_name="train", overrides=[*hydra_args, *job], return_hydra_config=True)
                subdir = str(cfg.hydra.sweep.subdir)
            except Exception as e:
                raise ConfigError(f"run [{where}]: {explain(e)}") from None
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"run [{where}]: {e}") from None
            if subdir in subdirs:
                raise ConfigError(f"runs [{' '.join(subdirs[subdir])}] and [{where}] would share the run directory "
                                  f"{subdir!r}; make them differ in a key that names run directories")
            subdirs[subdir] = job
    return list(subdirs)


def _exclude_keys() -> list[str]:
    from omegaconf import OmegaConf

    from klrl.cli.train import CONF_DIR

    train = OmegaConf.load(Path(CONF_DIR) / "train.yaml")
    return list(OmegaConf.select(train, "hydra.job.config.override_dirname.exclude_keys", default=[]) or [])


def parse_args(args: list[str]) -> tuple[str | None, dict[str, bool], list[str]]:
    name, flags, overrides = None, {"wait": True, "list": False, "help": False}, []
    for a in args:
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a == "--no-wait":
            flags["wait"] = False
        elif a == "--list":
            flags["list"] = True
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}; choose from: --no-wait, --list, --help")
        elif name is None:
            name = a
        else:
            overrides.append(a)
    return name, flags, overrides


def hydra_argv(grid: Grid, user_overrides: list[str], wait: bool) -> tuple[list[str], list[str]]:
    """-> (hydra overrides, task overrides) for the multirun: the grid's, then the user's (which win)."""
    file_hydra, file_task = split_hydra(grid.overrides)
    user_hydra, user_task = split_hydra(user_overrides)
    user_keys = {_key(o).lstrip("+~") for o in user_hydra}
    hydra_args = ["hydra/sweeper=klrl_grid", f"hydra.sweeper.grid={grid.path}"]
    if file_task:
        # The grid's common overrides are the same for every run of this sweep dir: run directories are named by
        # what varies (the grid, the command line), which also keeps the names under the 255-byte limit.
        common = sorted({_key(o).lstrip("+~") for o in file_task})
        hydra_args.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_exclude_keys() + common)}]")
    if "hydra/launcher" not in user_keys:
        hydra_args.append(f"hydra/launcher={grid.launcher}")
    if "hydra.sweep.dir" not in user_keys:
        hydra_args.append(f"hydra.sweep.dir={(Path.cwd() / SWEEP_ROOT / grid.name)}")
    if not wait:
        hydra_args.append("hydra.launcher.wait=false")
    return [*hydra_args, *file_hydra, *user_hydra], ["resume=true", *file_task, *user_task]


def main(args: list[str]) -> None:
    from klrl.cli.train import CONF_DIR, fail

    try:
        name, flags, overrides = parse_args(args)
        if flags["help"] or name is None:
            bad = name is None and not flags["help"]
            print(USAGE.format(grids=", ".join(available())), end="", file=sys.stderr if bad else sys.stdout)
            if bad:
                sys.exit(2)
            return
        grid = load_grid(name)
        hydra_args, task_args = hydra_argv(grid, overrides, flags["wait"])
        jobs = expand(grid.subgrids, task_args)
        subdirs = check_jobs(jobs, CONF_DIR, hydra_args)
    except ConfigError as e:
        fail(str(e))
    if flags["list"]:
        print(f"{grid.name}: {len(jobs)} runs{' - ' + grid.description if grid.description else ''}")
        for subdir in subdirs:
            print(f"  {subdir}")
        return
    from klrl.cli.train import train_main

    sys.argv = ["klrl sweep", "-m", *hydra_args, *task_args]
    train_main()
