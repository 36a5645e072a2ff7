"""Schemas of klrl's launchers and sweeper, registered in Hydra's ConfigStore when Hydra scans its plugins.

The launcher schemas extend hydra-submitit-launcher's (every submitit/sbatch knob keeps its name, meaning and place:
hydra.launcher.partition, .timeout_min, .max_num_timeout, ...) with klrl's two keys, `wait` and `skip_finished`.
conf/hydra/launcher/{slurm,local}.yaml select them and list every knob with a comment. The schemas' defaults are
those files' values, so that `hydra/launcher=klrl_submitit_slurm` (listed by --hydra-help too) is the same launcher
as `hydra/launcher=slurm`, not one with the stock 60-minute limit and no requeue on time-out.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

# One folder per submission: Slurm restarts job ids at 1 on a fresh cluster state, and submitit, finding an old
# <id>_result.pkl under a folder keyed only by %j (the stock default), returns that stale result without running
# anything.
SUBMITIT_FOLDER = "${hydra.sweep.dir}/.submitit/${now:%Y-%m-%d_%H-%M-%S-%f}/%j"


@dataclass
class KlrlSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.klrl_sweeps.launcher.KlrlSlurmLauncher"
    submitit_folder: str = SUBMITIT_FOLDER
    timeout_min: int = 1440  # per job; a run that needs longer goes on in a requeued job
    max_num_timeout: int = 20  # requeues after a time-out (stock: 0, i.e. a timed-out run stops there)
    # sbatch --requeue: requeueable even where the cluster's JobRequeue default is 0 (submitit's requeue needs it).
    additional_parameters: Dict[str, Any] = field(default_factory=lambda: {"requeue": True})
    # false: submit the array, record the job ids in the sweep dir, print them and return at once (`--no-wait`).
    wait: bool = True
    # Leave out runs whose summary.json already says completed or diverged (for the same `steps`).
    skip_finished: bool = True


@dataclass
class KlrlLocalQueueConf(LocalQueueConf):
    _target_: str = "hydra_plugins.klrl_sweeps.launcher.KlrlLocalLauncher"
    submitit_folder: str = SUBMITIT_FOLDER
    timeout_min: int = 10080  # a week: the local executor kills a run at its time limit
    wait: bool = True
    skip_finished: bool = True


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.klrl_sweeps.sweeper.GridSweeper"
    # A grid file (sweeps/NAME.yaml layout); its `grid:` list of sub-grids is crossed with the command line's
    # overrides. null: behave exactly like Hydra's basic sweeper.
    grid: Optional[str] = None
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


cs = ConfigStore.instance()
cs.store(group="hydra/launcher", name="klrl_submitit_slurm", node=KlrlSlurmQueueConf, provider="klrl")
cs.store(group="hydra/launcher", name="klrl_submitit_local", node=KlrlLocalQueueConf, provider="klrl")
cs.store(group="hydra/sweeper", name="klrl_grid", node=GridSweeperConf, provider="klrl")
