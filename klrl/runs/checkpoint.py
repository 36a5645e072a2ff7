"""Checkpoints in a run directory: written whole or not at all, the previous good one kept, corrupt ones reported.

A save writes checkpoint.pt under a temporary name and renames it into place, after moving the current one to
checkpoint.prev.pt: a kill or a full disk during the save leaves the last good checkpoint as it was. Loading tries
checkpoint.pt, then checkpoint.prev.pt, and names any file it could not read (`Loaded.skipped`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from klrl.errors import ConfigError
from klrl.runs.rundir import CHECKPOINT, RunDir, atomic_write, rng_state

PREVIOUS = "checkpoint.prev.pt"


@dataclass
class Loaded:
    state: dict | None  # the newest readable checkpoint, None when there is none
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # "<file>: <why>" for each unreadable one


def save(run: RunDir, step: int, model_state: dict, optim_state: dict, scheduler, extra: dict | None = None) -> None:
    import torch

    state = {"step": step, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "rng": rng_state(), **(extra or {})}
    current, previous = run.file(CHECKPOINT), run.file(PREVIOUS)
    if current.exists():
        os.replace(current, previous)  # a rename: the good checkpoint stays whole under its new name
    try:
        atomic_write(current, lambda f: torch.save(state, f), mode="wb")
    except BaseException as e:
        if previous.exists() and not current.exists():
            os.replace(previous, current)  # the new one never landed: the last good one is current again
        if isinstance(e, Exception):
            raise CheckpointWriteError(f"could not write {current} ({why(e, run)}); the last good checkpoint is "
                                       "intact, resume from it once there is room") from e
        raise


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file size limit): one line, the last one is intact."""


def why(e: Exception, run: RunDir) -> str:
    """In a few words, why a write failed: torch's zip writer reports a full disk as 'unexpected pos'."""
    import errno
    import shutil

    codes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for this filesystem or limit"}
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in codes:
            return codes[err.errno]
    try:
        free = shutil.disk_usage(run.path).free
    except OSError:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    return f"{free / 2**20:.0f} MiB free; {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


def load(run: RunDir) -> Loaded:
    import torch

    skipped = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run.file(name)
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a klrl checkpoint")
            return Loaded(state, path, skipped)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, or another program's file
            skipped.append(f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
    return Loaded(None, None, skipped)


def _ring_shard(run: RunDir, step: int, rank: int, world: int) -> Path:
    return run.file(f"ring-step{step}-rank{rank}of{world}.pt")


def save_ring_shard(run: RunDir, step: int, rank: int, world: int, snapshots: list) -> None:
    """This rank's shard of the lag ring (FSDP), beside the checkpoint of the same step. The last two saves' shards
    are kept: the previous checkpoint (kept until the new one is complete) refers to the older one."""
    import torch

    atomic_write(_ring_shard(run, step, rank, world), lambda f: torch.save(snapshots, f), mode="wb")
    mine = sorted(run.path.glob(f"ring-step*-rank{rank}of{world}.pt"),
                  key=lambda p: int(p.name.split("-")[1].removeprefix("step")))
    for old in mine[:-2]:
        old.unlink(missing_ok=True)


def load_ring_shard(run: RunDir, step: int, rank: int, world: int, saved_world: int) -> list:
    import torch

    if saved_world != world:
        raise ConfigError(f"resume: the lag ring of {run.path} was saved sharded over {saved_world} ranks; "
                          f"resume it with {saved_world} ranks, not {world}")
    path = _ring_shard(run, step, rank, world)
    if not path.exists():
        raise ConfigError(f"resume: {path.name} is missing from {run.path}; the checkpoint cannot be resumed exactly")
    return torch.load(path, map_location="cpu", weights_only=False)
