"""A training process's hold on its run directory: the read-only checks before anything is written, the lock, the
summary and its heartbeat, and SLURM's preemption signal."""

from __future__ import annotations

import logging
import os
import signal
import threading
from importlib.metadata import PackageNotFoundError, version

from omegaconf import OmegaConf

from klrl.errors import ConfigError
from klrl.runs.checkpoint import PREVIOUS
from klrl.runs.rundir import CHECKPOINT, FINAL, HEARTBEAT_S, RunDir
from klrl.training.evaluate import eval_sampling

log = logging.getLogger(__name__)
TRACE = "klrl.trace"  # a logger that writes to the run's train.log and nowhere else
logging.getLogger(TRACE).propagate = False
LOCK = ".hydra/lock"  # held (flock) by the process training the run
VERSIONED = ("torch", "transformers", "tokenizers", "numpy", "klrl")  # what decides the numbers a run reports


def check_run(cfg, run: RunDir) -> str | None:
    """Whether this config may train in this directory, decided by reading only (a refused command writes nothing):
    ConfigError for a refusal, the final status if the run already finished, None to go on."""
    files = [run.file(n) for n in (CHECKPOINT, PREVIOUS) if run.file(n).exists()]
    has_ckpt = bool(files)
    broken = [f"{f.name}: {why}" for f in files if (why := unreadable(f))]
    if files and len(broken) == len(files):
        raise ConfigError(f"{run.path} holds no readable checkpoint ({'; '.join(broken)}); move that run away, or "
                          "choose another hydra.run.dir")
    for b in broken:
        log.warning("%s: %s; resuming from the previous checkpoint", run.path, b)
    try:
        summary, stored = run.read_summary(), run.read_config()
    except ValueError as e:
        raise ConfigError(f"{run.path}: {e}; move that run away or choose another hydra.run.dir") from None
    if cfg.resume is False and (has_ckpt or stored is not None):
        state, at = (summary or {}).get("status"), (summary or {}).get("step")
        hint = ("resume=auto reports it" + (f" and steps > {at} continues it" if state == "completed" else "")
                if state in FINAL else "resume=auto continues it")
        done = f", {state} at step {at}" if state in FINAL else ""
        raise ConfigError(f"{run.path} already holds a run{done}: {hint}, or choose another hydra.run.dir")
    if cfg.resume is True and not has_ckpt:
        raise ConfigError(f"resume=true but {run.path} holds no checkpoint to continue; resume=auto starts a new run")
    reached = (summary or {}).get("step") or 0
    if (has_ckpt or stored is not None) and cfg.steps < reached:  # steps may grow on resume, never cut a run short
        raise ConfigError(f"{run.path} holds a run at step {reached}; steps={cfg.steps} would rewrite it as a shorter "
                          f"one: give steps >= {reached} to continue it, or choose another hydra.run.dir")
    diff = run.drift(cfg)
    if diff:
        raise ConfigError(f"{run.path} holds a run with another configuration ({'; '.join(diff[:5])}); resume it with "
                          "its own settings, or choose another hydra.run.dir")
    if summary and summary.get("status") in FINAL and summary.get("steps") == cfg.steps:
        log.info("%s: already %s at step %s, nothing to do", run.path, summary["status"], summary.get("step"))
        return summary["status"]
    return None


def unreadable(path) -> str | None:
    """Why a checkpoint file cannot be loaded (truncated, not a torch zip archive), or None. Cheap: reads only the
    archive's directory, at its end, which is what a killed or full-disk write leaves missing."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "not a torch checkpoint"
    except (OSError, zipfile.BadZipFile) as e:
        return f"truncated or corrupt ({type(e).__name__})"
    return None


def rank() -> int:
    """This process's rank, before the process group exists (torchrun's RANK, or SLURM's task id)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class lock_run:  # noqa: N801 (used as a context manager)
    """An exclusive lock on the run directory for this process (rank 0): a second process is refused."""

    def __init__(self, run: RunDir):
        from filelock import FileLock

        self.run = run
        self.lock = FileLock(str(run.file(LOCK))) if rank() == 0 else None

    def __enter__(self):
        from filelock import Timeout

        if self.lock is None:
            return self
        self.run.file(LOCK).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"another process is training {self.run.path} (it holds {self.run.file(LOCK)}); "
                              "wait for it, or choose another hydra.run.dir") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def start_summary(cfg, run: RunDir, main: bool) -> dict:
    """The run's config files and summary, written now that every check has passed; train.log from here on."""
    prev = run.read_summary() or {}
    summary = {"status": "running", "step": prev.get("step", 0), "steps": cfg.steps, "run_dir": str(run.path),
               "eval_sampling": eval_sampling(cfg), "versions": versions()}
    for kept in ("initial_eval", "logger_ids"):  # a resumed run keeps its first evaluation and its W&B/MLflow runs
        if prev.get(kept):
            summary[kept] = prev[kept]
    if main:
        overrides, hydra_yaml = [], None
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            overrides, hydra_yaml = list(hc.overrides.task), OmegaConf.to_yaml(hc)
        except ValueError:  # not inside a Hydra app (tests, benchmarks)
            pass
        run.write_config(OmegaConf.to_yaml(cfg), overrides, hydra_yaml)
        run.write_summary(summary)
        handler = logging.FileHandler(run.file("train.log"))
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger(TRACE).addHandler(handler)  # tracebacks go to train.log only; the console gets one line
    return summary


def finish(run: RunDir, summary: dict, status: str, step: int, main: bool, **extra) -> str:
    summary.update(status=status, step=step, **extra)
    if main:
        run.write_summary(summary)
    return status


class Heartbeat:
    """Touches the run's heartbeat file every HEARTBEAT_S seconds while the process lives: `klrl status` tells a
    run whose process was killed (stale) from one that is training, even through a long evaluation."""

    def __init__(self, run: RunDir, main: bool):
        self.run, self.main = run, main
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="klrl-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.run.touch_heartbeat()
            except OSError:  # a full disk or a vanished directory must not kill the run
                pass
            if self.stop.wait(HEARTBEAT_S):
                return

    def __enter__(self):
        if self.main:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


class Preemption:
    """SIGUSR2 is SLURM's "you are about to be preempted / time out" (submitit requeues on it): the trainer finishes
    its step, checkpoints, then hands over to whoever handled the signal before."""

    def __init__(self):
        self.signalled: list = []
        self.hooked = threading.current_thread() is threading.main_thread()
        self.previous = None

    def __enter__(self):
        if self.hooked:
            self.previous = signal.signal(signal.SIGUSR2, lambda signum, frame: self.signalled.append((signum, frame)))
        return self

    def agreed(self, dist) -> bool:
        """Whether any rank was signalled (collective: a rank that stopped alone would block the others)."""
        return dist.sum(float(bool(self.signalled))) > 0

    def hand_over(self) -> None:
        self._restore()
        if callable(self.previous) and self.signalled:
            self.previous(*self.signalled[0])

    def _restore(self) -> None:
        if self.hooked:
            signal.signal(signal.SIGUSR2, self.previous or signal.SIG_DFL)
            self.hooked = False

    def __exit__(self, *exc) -> None:
        self._restore()


class MarkFailed:
    """An exception (Ctrl-C included) leaves the run marked `failed`, with the error, in its summary."""

    def __init__(self, run: RunDir, summary: dict, main: bool):
        self.run, self.summary, self.main = run, summary, main

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if kind is not None and not issubclass(kind, SystemExit):
            finish(self.run, self.summary, "failed", self.summary["step"], self.main, error=f"{kind.__name__}: {e}")
        return False
