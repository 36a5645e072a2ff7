"""`hydra/sweeper=klrl_grid`: Hydra's basic sweeper, whose job list is a union of cartesian products.

With `hydra.sweeper.grid=NAME|FILE` each sub-grid of the grid file is crossed with the command line's overrides
(klrl.runs.sweep.expand: the same expansion `klrl sweep` validates before anything starts); the whole union goes to the
launcher as one batch, i.e. one job array. Without a grid it is the basic sweeper.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from klrl.hydra_private import basic_sweeper_class
from hydra.core.override_parser.types import Override


class GridSweeper(basic_sweeper_class()):
    def __init__(self, grid: Optional[str] = None, max_batch_size: Optional[int] = None,
                 params: Optional[Dict[str, str]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grid = grid

    # BasicSweeper.sweep calls self.split_arguments(overrides, max_batch_size); everything else is inherited.
    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        if self.grid is None:
            return basic_sweeper_class().split_arguments(overrides, max_batch_size)
        from klrl.runs.sweep import expand, load_grid

        jobs = expand(load_grid(self.grid).subgrids, [o.input_line for o in overrides])
        n = max_batch_size or len(jobs)
        return [jobs[i:i + n] for i in range(0, len(jobs), n)]
