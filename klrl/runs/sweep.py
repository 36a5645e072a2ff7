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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klrl.errors import ConfigError

from klrl.paths import SWEEPS_DIR

SWEEP_ROOT = Path("outputs") / "sweeps"
GRID_KEYS = ("description", "launcher", "overrides", "grid")
# Characters Hydra's override grammar accepts in an unquoted value (a subset: anything else gets quoted).
_SAFE_VALUE = re.compile(r"^[\w\-./+:@%*?|]+$")



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
    from klrl.hydra_private import split_arguments
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
        for job in itertools.chain.from_iterable(split_arguments(parsed)):
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
