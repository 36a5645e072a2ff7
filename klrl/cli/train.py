"""`klrl train`: the Hydra application around the trainer core.

Before Hydra runs, every run the command would start is composed and validated (klrl.cli.compose.preflight); a
single run's directory is chosen and created here, so that a refused command leaves nothing behind and removes
only what it created. Default names carry every non-default choice (the command line's overrides, keys that may
change on resume aside), and an existing name gets a suffix, so two runs never share a directory.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from klrl.cli.compose import (canonical, output_dir, parse_args, preflight, preset_warning, register_configs,
                               split_args)
from klrl.errors import ConfigError
from klrl.paths import CONF_DIR
from klrl.runs.rundir import check_nesting, run_name

log = logging.getLogger("klrl")
register_configs()
CREATED: list[Path] = []  # the directories this process created for its run, deepest last
INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--resolve", "-p", "--package")


def fail(msg: str, code: int = 2) -> None:
    print(f"klrl: {msg}", file=sys.stderr)
    sys.exit(code)


def make_dirs(path: Path, exist_ok: bool) -> Path:
    """Create `path` (and missing parents), noting which this process created; ConfigError (one line) if it
    cannot be created. exist_ok=False picks the first free `path`, `path_2`, ... (mkdir is atomic: two runs
    started in the same second get two directories)."""
    try:
        ancestors = [p for p in path.parents if not p.exists()][::-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        CREATED.extend(ancestors)
        if exist_ok and path.is_dir():
            return path
        for i in range(1, 1000):
            candidate = path if i == 1 else path.with_name(f"{path.name}_{i}")
            try:
                candidate.mkdir()
            except FileExistsError:
                if exist_ok:
                    raise
                continue
            CREATED.append(candidate)
            return candidate
    except OSError as e:
        raise ConfigError(f"hydra.run.dir={str(path)!r} cannot be created ({e.strerror or e}); choose another") from None
    raise ConfigError(f"hydra.run.dir={str(path)!r}: 999 runs of that name exist; choose another")


def choose_run_dir(args: list[str], cfg: DictConfig) -> list[str]:
    """A single run's directory, created now; the arguments that point Hydra at it."""
    if any(a.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for a in args):
        value = str(cfg.hydra.run.dir)
        output_dir("hydra.run.dir", value)
        make_dirs(Path(value).expanduser(), exist_ok=True)
        return args
    overrides, _, _ = split_args(args)
    task = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    root = Path(str(cfg.hydra.run.dir)).parent  # outputs/runs/<date>
    check_nesting("hydra.run.dir", root, "parent")  # e.g. an earlier run made with hydra.run.dir=outputs/runs/<date>
    path = make_dirs(root / f"{time.strftime('%H-%M-%S')}_{run_name(task)}", exist_ok=False)
    quoted = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return [*args, f"hydra.run.dir='{quoted}'"]  # quoted: a default name holds '=' and ','



def remove_created() -> None:
    """A run refused after its directory was made leaves nothing behind: only what this process created goes, and
    never a run that started (its .hydra/config.yaml is written once the run has passed its checks)."""
    if CREATED and (CREATED[-1] / ".hydra" / "config.yaml").exists():
        return
    for path in reversed(CREATED):
        if path == CREATED[-1] and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            _rmdir(path)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()  # only if empty: something else may have appeared there meanwhile
    except OSError:
        pass


def main(args: list[str]) -> None:
    CREATED.clear()  # what an earlier command of this process created is not this one's to remove
    try:
        configs = preflight(args)
        for warning in dict.fromkeys(filter(None, map(preset_warning, configs or []))):
            print(f"klrl: warning: {warning}", file=sys.stderr)
        args = canonical(parse_args(args))  # flags first, as Hydra's parser needs them
        single = configs and len(configs) == 1 and "-m" not in args
        if single and not any(a.split("=")[0] in INFO_FLAGS for a in args):
            args = choose_run_dir(args, configs[0])
    except ConfigError as e:
        fail(str(e))
    sys.argv = ["klrl train", *args]
    try:
        train_main()
    except SystemExit as e:  # Hydra's own refusals exit too: leave nothing behind
        if e.code not in (0, None):
            remove_created()
        raise


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig) -> str:
    from klrl.runs.rundir import RunDir
    from klrl.runs.status import run_report
    from klrl.training.run import rank
    from klrl.training.trainer import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    # In a sweep, a failing run raises: the launcher records it and the other runs go on. A single run exits.
    sweeping = hc.mode == RunMode.MULTIRUN
    t0 = time.monotonic()
    finished = RunDir(run_dir).finished(cfg.steps)  # read only: a finished run is reported, not trained again
    try:
        status = train(cfg, run_dir)
    except ConfigError as e:
        remove_created()
        if sweeping:
            raise RuntimeError(f"klrl: {e}") from None
        fail(str(e))
    except (Exception, KeyboardInterrupt) as e:  # the trainer has marked the run failed in its summary
        logging.getLogger("klrl.trace").error("run failed", exc_info=True)  # train.log, once the run has one
        if sweeping and not isinstance(e, KeyboardInterrupt):
            raise RuntimeError(f"run failed ({type(e).__name__}: {e}); see {run_dir}") from None
        fail(f"run failed ({type(e).__name__}: {e}); see {run_dir}", code=1)
    log.info("%s: %s", status, run_dir)
    if not sweeping and rank() == 0:  # a sweep's runs are reported together by `klrl table`
        print(run_report(RunDir(run_dir), None if finished else time.monotonic() - t0), flush=True)
    return status


if __name__ == "__main__":  # `python -m klrl.cli.train ...`, as submitit re-runs a job
    main(sys.argv[1:])
