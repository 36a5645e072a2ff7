"""The run directory: atomic files, checkpoints, metrics.jsonl, summary.json.

Layout:
  .hydra/            resolved config (written by Hydra)
  metrics.jsonl      one JSON object per training step (and per evaluation)
  summary.json       status (running | completed | diverged | failed), step reached, final evaluation
  checkpoint.pt      model, optimizer, scheduler, RNG states, step: written at a temporary name, then renamed
  tb/                TensorBoard events
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

SUMMARY, METRICS, CHECKPOINT = "summary.json", "metrics.jsonl", "checkpoint.pt"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a JSON-lines file; a torn line (a process killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)


def rng_state() -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, step: int, model_state: dict, optim_state: dict, scheduler,
                    extra: dict | None = None) -> None:
    import torch

    state = {
        "step": step,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **(extra or {}),
    }
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f), mode="wb")


def _ring_shard(run_dir: Path, step: int, rank: int, world: int) -> Path:
    return Path(run_dir) / f"ring-step{step}-rank{rank}of{world}.pt"


def save_ring_shard(run_dir: Path, step: int, rank: int, world: int, snapshots: list) -> None:
    """This rank's shard of the lag ring (FSDP), beside the checkpoint of the same step. This and the previous
    save's shard are kept: until rank 0 has replaced checkpoint.pt, the one on disk is the previous step's."""
    import torch

    atomic_write(_ring_shard(run_dir, step, rank, world), lambda f: torch.save(snapshots, f), mode="wb")
    mine = sorted(Path(run_dir).glob(f"ring-step*-rank{rank}of{world}.pt"),
                  key=lambda p: int(p.name.split("-")[1].removeprefix("step")))
    for old in mine[:-2]:
        old.unlink(missing_ok=True)


def load_ring_shard(run_dir: Path, step: int, rank: int, world: int, saved_world: int) -> list:
    import torch

    from klrl.config.schema import ConfigError

    if saved_world != world:
        raise ConfigError(f"resume: the lag ring of {run_dir} was saved sharded over {saved_world} ranks; "
                          f"resume it with {saved_world} ranks, not {world}")
    path = _ring_shard(run_dir, step, rank, world)
    if not path.exists():
        raise ConfigError(f"resume: {path.name} is missing from {run_dir}; the checkpoint cannot be resumed exactly")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(run_dir: Path) -> dict | None:
    import torch

    path = Path(run_dir) / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


class MetricsLog:
    """metrics.jsonl (append-only, one line written whole per record), TensorBoard, and a live progress bar."""

    def __init__(self, run_dir: Path, start_step: int, total: int, tensorboard: bool, progress: bool):
        self.path = Path(run_dir) / METRICS
        # After a resume, drop records from steps past the checkpoint: they will be produced again, identically.
        kept = [r for r in read_metrics(run_dir) if r["step"] <= start_step] if start_step else []
        atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True, leave=True)

    def write(self, record: dict) -> None:
        # One write() of the whole line on an O_APPEND descriptor: a kill never interleaves half a record.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None and record.get("kind") == "train":
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl/exact']:.4f}", refresh=False)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
