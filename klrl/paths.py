"""Where klrl's configs and named grids are: `conf/` and `sweeps/` at the top of the source tree."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
SWEEPS_DIR = ROOT / "sweeps"
