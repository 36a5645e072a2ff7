"""`klrl sweep NAME`: launch a named grid (sweeps/NAME.yaml, see klrl.runs.sweep) as one job array.

It expands the grid, composes and validates every point (the same one-line errors as `klrl train`), then runs the
Hydra app in multirun mode with klrl's grid sweeper (which performs the same expansion); every run has the
default `resume=auto`, so submitting the same command again continues unfinished runs and skips finished ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klrl.cli.compose import compose, distinct_runs, output_dir
from klrl.errors import ConfigError
from klrl.paths import CONF_DIR
from klrl.runs.sweep import SWEEP_ROOT, Grid, _key, available, expand, load_grid, split_hydra

USAGE = """usage: klrl sweep NAME|FILE.yaml [--no-wait] [--list] [OVERRIDE ...]

Launch the grid in sweeps/NAME.yaml (or FILE.yaml) as ONE job array. Sweep dir: outputs/sweeps/NAME (change
with hydra.sweep.dir=...). Running the same command again skips finished runs and resumes the others from their
checkpoints (resume=auto, the default).

  --no-wait   submit, print the sweep dir and the job ids, and return (watch with `klrl status SWEEP_DIR`)
  --list      print the runs the grid expands to, and exit
  OVERRIDE    crossed with every grid point, e.g. steps=2 seed=0,1; or the launch: hydra/launcher=slurm
              hydra.launcher.partition=gpu hydra.launcher.account=myproj

grids: {grids}
"""


def check_jobs(jobs: list[list[str]], conf_dir: str | None = None, hydra_args: list[str] = ()) -> list[str]:
    """Compose and validate every run (with the launch's hydra overrides, so that a launcher key the chosen
    launcher lacks fails here too), and the sweep directory; returns each run's directory name (hydra.sweep.subdir).

    Raises ConfigError naming the grid point, or two points that would write to the same run directory.
    """
    configs = []
    for job in jobs:
        try:
            configs.append(compose([*hydra_args, *job], hydra=True))
        except ConfigError as e:
            raise ConfigError(f"run [{' '.join(job) or '(defaults)'}]: {e}") from None
    for sweep_dir in sorted({str(c.hydra.sweep.dir) for c in configs}):
        output_dir("hydra.sweep.dir", sweep_dir)
    return distinct_runs(jobs, configs)


def _exclude_keys() -> list[str]:
    from omegaconf import OmegaConf

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
    return [*hydra_args, *file_hydra, *user_hydra], [*file_task, *user_task]


def read_grid(name: str) -> Grid:
    """The grid file, or ConfigError (one line) when it cannot be read as one."""
    try:
        return load_grid(name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (YAML syntax, unreadable file: OmegaConf's multi-line errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"grid {name}: cannot be read ({type(e).__name__}: {first})") from None


def main(args: list[str]) -> None:
    from klrl.cli.train import fail

    try:
        name, flags, overrides = parse_args(args)
        if flags["help"]:
            print(USAGE.format(grids=", ".join(available())), end="")
            return
        if name is None:
            raise ConfigError(f"sweep: give a grid (klrl sweep NAME|FILE.yaml); choose from: {', '.join(available())}")
        grid = read_grid(name)
        hydra_args, task_args = hydra_argv(grid, overrides, flags["wait"])
        jobs = expand(grid.subgrids, task_args)
        subdirs = check_jobs(jobs, hydra_args=hydra_args)
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
