"""Where klrl's configs and named grids are: `conf/` and `sweeps/` at the top of the source tree, installed as the
package data `klrl._conf` and `klrl._sweeps` (pyproject.toml maps those packages onto the two folders).

They are found through the import system, so one lookup serves every way klrl can be present: a wheel or a
non-editable `pip install .` (site-packages/klrl/_conf), an editable `pip install -e .` (setuptools' finder maps
`klrl._conf` to <checkout>/conf), and a bare checkout on sys.path with nothing installed (the folders beside klrl/).
`klrl._conf` has no __init__.py (it is a folder of YAML files), so it is a namespace package, for which
`importlib.resources.files()` gives no real directory (a MultiplexedPath, or an error under an editable install);
its spec's search locations do. Hydra needs a real directory (hydra.main(config_path=...), initialize_config_dir).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _data_dir(package: str, folder: str, marker: str) -> Path:
    """The directory of the data package `package` (`folder` in a checkout): the first candidate holding `marker`."""
    try:
        spec = importlib.util.find_spec(package)
    except ImportError:
        spec = None
    candidates = [Path(p) for p in spec.submodule_search_locations or []] if spec is not None else []
    candidates.append(Path(__file__).resolve().parent.parent / folder)  # a checkout on sys.path, not installed
    for c in candidates:
        if c.is_absolute() and (c / marker).exists():
            return c.resolve()
    raise FileNotFoundError(f"klrl's {folder}/ ({marker}) is not in any of: {', '.join(map(str, candidates))}; "
                            f"reinstall klrl (`pip install .`, or `pip install -e .` in a checkout)")


CONF_DIR = str(_data_dir("klrl._conf", "conf", "train.yaml"))
SWEEPS_DIR = _data_dir("klrl._sweeps", "sweeps", ".")


def install_hint(extra: str) -> str:
    """The pip command that adds klrl's optional extra: from the checkout klrl runs from (with its pinned versions)
    when there is one, else by name."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").exists():
        pins = "-c constraints.txt " if (root / "constraints.txt").exists() else ""
        return f"pip install {pins}-e '.[{extra}]' in {root}"
    return f"pip install 'klrl[{extra}]'"
