"""Data parallelism inside one job: torchrun, or SLURM tasks started by submitit (tasks_per_node > 1).

Each rank generates and scores its share of the prompts; gradients are summed across ranks and divided by the world
size, which equals the single-process gradient of the global batch because every rank's loss is a mean over an equal
share of sequences (token_mean gets a global token count). Only rank 0 writes to the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share; len(items) must be divisible by the world size."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def mean_dict(self, d: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return d
        keys = sorted(d)
        t = torch.tensor([d[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def average_gradients(self, model: torch.nn.Module) -> None:
        if self.world == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world


def setup(device: torch.device) -> Dist:
    """Join the process group when launched with several processes; a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()  # sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def local_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
