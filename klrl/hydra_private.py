"""The one module that touches Hydra's private API (`hydra._internal`), because no public API does these things:

- `BasicSweeper`: how Hydra expands a sweep's overrides into jobs (`split_arguments`). klrl validates every point of
  a multirun before anything runs, and its grid sweeper extends this sweeper, so it must expand exactly as Hydra
  will; Hydra exposes sweepers only as plugins that run jobs.
- `get_args_parser`: Hydra's own command-line parser, so that `klrl train` reads flags (`--cfg`, `-m`, ...) and
  overrides exactly as the Hydra app will.

Pinned hydra-core (>=1.3.2,<1.4) keeps these stable; a Hydra upgrade is checked here first.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser

BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"


def basic_sweeper_class() -> type:
    """BasicSweeper as Hydra's plugin scan last loaded it: the scan re-executes its core plugin modules, so a class
    imported before it is stale, and a sweeper built on that one fails in BasicSweeper.__init__'s super() call."""
    import importlib

    return importlib.import_module(BasicSweeper.__module__).BasicSweeper


def split_arguments(overrides, max_batch_size=None):
    """Hydra's expansion of sweep overrides (parsed `Override`s) into batches of jobs (lists of `key=value`)."""
    return BasicSweeper.split_arguments(overrides, max_batch_size)


__all__ = ["BASIC_SWEEPER", "BasicSweeper", "basic_sweeper_class", "get_args_parser", "split_arguments"]
