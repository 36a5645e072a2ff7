"""Where a run's records go: metrics.jsonl (always), TensorBoard, a progress bar. Each sink has write / flush /
close; `Loggers` fans a record out to all of them.

metrics.jsonl is buffered and written every FLUSH_S seconds, at every checkpoint and at exit: a kill loses at most
the last few seconds of records, all of them after the last checkpoint, which a resumed run produces again.
"""

from __future__ import annotations

import time
from pathlib import Path

from klrl.runs.rundir import RunDir

FLUSH_S = 5.0


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

    def close(self) -> None:
        self.flush()


class TensorBoard:
    def __init__(self, run: RunDir, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run.path) / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.tb.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


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

    def close(self) -> None:
        self.bar.close()


class Loggers:
    """Every sink of a run (rank 0's; other ranks get none)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for s in self.sinks:
            s.write(record)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def make_loggers(cfg, run: RunDir, start_step: int, main: bool) -> Loggers:
    if not main:
        return Loggers([])
    sinks: list = [MetricsFile(run, start_step)]
    if cfg.tensorboard:
        sinks.append(TensorBoard(run, start_step))
    if cfg.progress:
        sinks.append(ProgressBar(start_step, cfg.steps))
    return Loggers(sinks)
