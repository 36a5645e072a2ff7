"""`klrl train`: the Hydra application around the trainer core, with one-line errors for bad input."""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from klrl.config.schema import CONF_DIR, ConfigError, register_configs
from klrl.runs.rundir import SUMMARY, read_json, write_json

log = logging.getLogger("klrl")
register_configs()


def fail(msg: str, code: int = 2) -> None:
    print(f"klrl: {msg}", file=sys.stderr)
    sys.exit(code)


def _remove_if_fresh(run_dir: Path) -> None:
    """A run that never started leaves no directory behind (Hydra creates it before calling us)."""
    if any(p.name not in (".hydra", "train.log") for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent.name not in ("outputs", "") and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig) -> str:
    from klrl.training.trainer import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    # In a sweep, a failing run raises: the launcher records it and the other runs go on. A single run exits.
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        status = train(cfg, run_dir)
    except ConfigError as e:
        _remove_if_fresh(run_dir)
        if sweeping:
            raise RuntimeError(f"klrl: {e}") from None
        fail(str(e))
    except (Exception, KeyboardInterrupt) as e:
        summary_path = run_dir / SUMMARY
        summary = read_json(summary_path) if summary_path.exists() else {"steps": cfg.steps}
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        write_json(summary_path, summary)
        log.error("run failed:\n%s", traceback.format_exc())
        if sweeping and not isinstance(e, KeyboardInterrupt):
            raise RuntimeError(f"run failed ({type(e).__name__}: {e}); see {run_dir}") from None
        fail(f"run failed ({type(e).__name__}: {e}); see {run_dir}", code=1)
    log.info("%s: %s", status, run_dir)
    return status
