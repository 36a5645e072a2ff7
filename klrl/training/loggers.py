"""Where a run's records go: metrics.jsonl (always), the backends chosen by `logger=` (TensorBoard, Weights & Biases,
MLflow), a progress bar. Each sink has write / flush / close(status); `Loggers` fans a record out to all of them.

metrics.jsonl is buffered and written every FLUSH_S seconds, at every checkpoint and at exit: a kill loses at most
the last few seconds of records, all of them after the last checkpoint, which a resumed run produces again.

W&B and MLflow get the resolved config, every training and evaluation record (numbers only), the run's name (its
non-default choices, as its directory is named) and, in a sweep, the sweep's name as W&B group / MLflow experiment.
Their ids are kept in summary.json, so a resumed run continues the same W&B / MLflow run.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from klrl.runs.rundir import RunDir, comparable, run_name

FLUSH_S = 5.0
log = logging.getLogger(__name__)


def numbers(record: dict) -> dict[str, float]:
    """A record's numeric values, step aside (what every metric backend takes)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


@dataclass
class Identity:
    """How the backends name a run: its name, its sweep's (None for a single run), where local stores go."""

    name: str
    group: str | None
    home: Path


def identity(run: RunDir) -> Identity:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app (tests, benchmarks): the directory's name
        return Identity(run.path.name, None, run.path)
    name = run_name(list(hc.overrides.task))
    if hc.mode != RunMode.MULTIRUN:
        return Identity(name, None, run.path)
    sweep = Path(hc.sweep.dir)
    try:  # in a sweep, as `klrl status` shows it: its directory there (hydra.sweep.subdir), never shortened
        name = str(run.path.resolve().relative_to(sweep.resolve()))
    except ValueError:
        pass
    label = sweep.resolve()
    try:  # outputs/sweeps/NAME -> sweeps/NAME; elsewhere the whole path
        label = label.relative_to(Path.cwd().resolve() / "outputs")
    except ValueError:
        pass
    return Identity(name, str(label), sweep)


class MetricsFile:
    def __init__(self, run: RunDir, start_step: int, flush_s: float = FLUSH_S):
        self.run, self.flush_s = run, flush_s
        run.restart_metrics(start_step)
        self.buffer: list[dict] = []
        self.last = time.monotonic()
        self.started = False  # the first training record goes out at once: a starting run shows its first step

    def write(self, record: dict) -> None:
        self.buffer.append(record)
        first = record.get("kind") == "train" and not self.started
        self.started = self.started or first
        if first or record.get("kind") != "train" or time.monotonic() - self.last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.run.append_metrics(self.buffer)
        self.buffer = []
        self.last = time.monotonic()

    def close(self, status: str) -> None:
        self.flush()


class TensorBoard:
    def __init__(self, cfg, run: RunDir, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run.path) / "tb"), purge_step=start_step + 1 if start_step else None,
                                flush_secs=cfg.logger.tensorboard.flush_secs)

    def write(self, record: dict) -> None:
        for k, v in numbers(record).items():
            self.tb.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        self.tb.flush()

    def close(self, status: str) -> None:
        self.tb.close()


class Wandb:
    """wandb.init with the run's name, group and config; its files under the run directory. Online, offline or
    disabled is W&B's own setting (WANDB_MODE)."""

    def __init__(self, cfg, run: RunDir, who: Identity, ids: dict):
        import wandb

        c = cfg.logger.wandb
        ids.setdefault("wandb", uuid.uuid4().hex[:12])  # W&B run ids: [a-z0-9], unique per project
        self.run = wandb.init(project=c.project, entity=c.entity, group=c.group or who.group, name=who.name,
                              tags=list(c.tags), dir=str(run.path), id=ids["wandb"], resume="allow",
                              config=OmegaConf.to_container(cfg, resolve=True))

    def write(self, record: dict) -> None:
        self.run.log(numbers(record), step=int(record["step"]))

    def flush(self) -> None:
        pass  # W&B's own process writes as records come

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=1 if status == "failed" else 0)


MLFLOW_END = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}  # others: KILLED (resumable)


class MLflow:
    """An MLflow run in experiment logger.mlflow.experiment (the sweep's name in a sweep), at tracking_uri (a SQLite
    store beside the runs by default). Metrics are sent in batches, every FLUSH_S seconds and at every flush."""

    def __init__(self, cfg, run: RunDir, who: Identity, ids: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        c = cfg.logger.mlflow
        local = c.tracking_uri is None
        self.client = MlflowClient(c.tracking_uri or f"sqlite:///{(who.home / 'mlflow.db').resolve()}")
        name = c.experiment or who.group or "klrl"
        found = self.client.get_experiment_by_name(name)
        where = (who.home / "mlartifacts").resolve().as_uri() if local else None  # else the server's default
        exp = found.experiment_id if found else self.client.create_experiment(name, artifact_location=where)
        if "mlflow" in ids:  # a resumed run continues its MLflow run
            self.client.update_run(ids["mlflow"], status="RUNNING")
        else:
            ids["mlflow"] = self.client.create_run(exp, run_name=who.name).info.run_id
        self.id = ids["mlflow"]
        # MLflow params never change, and a resumed run may (steps, logger, ...): the params are what the run
        # computes; the whole config, as it now stands, is config.yaml
        params = [Param(k, str(v)[:6000]) for k, v in flatten(comparable(cfg)).items()]
        self.client.log_batch(self.id, params=params)
        self.client.log_dict(self.id, OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        self.buffer: list = []
        self.last = time.monotonic()

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(mlflow_key(k), float(v), now, int(record["step"])) for k, v in numbers(record).items()]
        if record.get("kind") != "train" or time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.client.log_batch(self.id, metrics=self.buffer)
        self.buffer, self.last = [], time.monotonic()

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_tag(self.id, "klrl.status", status)
        self.client.set_terminated(self.id, MLFLOW_END.get(status, "KILLED"))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def mlflow_key(key: str) -> str:
    """MLflow names take letters, digits, _ - . space : / only: eval/id/pass@1 -> eval/id/pass_at_1."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


class ProgressBar:
    def __init__(self, start_step: int, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True, leave=True)

    def write(self, record: dict) -> None:
        if record.get("kind") == "train":  # the values of the step just counted, not of the one before
            shown = {"reward": f"{record['reward']:.3f}"}
            if "kl/exact" in record:  # absent on steps without the extras (extras_every)
                shown["kl"] = f"{record['kl/exact']:.4f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.bar.close()


class Loggers:
    """Every sink of a run (rank 0's; other ranks get none). A context manager: at exit each sink is closed with the
    run's status (failed on an exception; interrupted when the run stopped for requeue)."""

    def __init__(self, sinks: list, summary: dict):
        self.sinks, self.summary = sinks, summary

    def write(self, record: dict) -> None:
        for s in self.sinks:
            s.write(record)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> None:
        status = "failed" if kind is not None else self.summary.get("status", "running")
        for s in self.sinks:
            try:
                s.close("interrupted" if status == "running" else status)
            except Exception as err:  # noqa: BLE001 (the run has its final status: a backend failing now must not
                # turn it into a failed one; every record up to the last checkpoint is on disk already)
                log.warning("%s did not close cleanly: %s: %s", type(s).__name__, type(err).__name__, err)


def make_loggers(cfg, run: RunDir, start_step: int, main: bool, summary: dict) -> Loggers:
    """The sinks `cfg` chooses; a backend's run ids go into `summary` (written at the next checkpoint)."""
    if not main:
        return Loggers([], summary)
    chosen = cfg.logger
    tensorboard = chosen.tensorboard is not None if cfg.tensorboard is None else cfg.tensorboard
    if cfg.tensorboard is not None:
        log.warning("tensorboard=%s is deprecated; choose backends with logger=[...] (logger=none for none)",
                    str(cfg.tensorboard).lower())
    if tensorboard and chosen.tensorboard is None:  # the deprecated tensorboard=true adds it with its defaults
        cfg = OmegaConf.merge(cfg, {"logger": {"tensorboard": {}}})
    sinks: list = [MetricsFile(run, start_step)]
    ids = summary.setdefault("logger_ids", {})
    who = identity(run) if chosen.wandb is not None or chosen.mlflow is not None else None
    sinks += [TensorBoard(cfg, run, start_step)] if tensorboard else []
    sinks += [Wandb(cfg, run, who, ids)] if chosen.wandb is not None else []
    sinks += [MLflow(cfg, run, who, ids)] if chosen.mlflow is not None else []
    if cfg.progress:
        sinks.append(ProgressBar(start_step, cfg.steps))
    return Loggers(sinks, summary)
