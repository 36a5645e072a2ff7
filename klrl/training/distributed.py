"""Data parallelism inside one job: torchrun, or SLURM tasks started by submitit (tasks_per_node > 1).

Each rank generates and scores its share of the prompts; gradients are summed across ranks and divided by the world
size, which equals the single-process gradient of the global batch because every rank's loss is a mean over an equal
share of sequences (token_mean gets a global token count). Only rank 0 writes to the run directory.

With model.fsdp=true the model is sharded with FSDP2 (`fully_shard`, the engine behind accelerate's FSDP plugin;
accelerate itself only enables FSDP on accelerators, and this path must run on gloo/CPU too, where it is tested):
each decoder layer is one unit, parameters, gradients and AdamW state live in shards of 1/world, gradients are
reduce-scattered in float32 and averaged, so the update is the same as plain data parallelism. Sampling runs on
gathered weights (`gathered`): one all-gather before `generate`, none per token, so ranks may stop at different
lengths. Checkpoints hold full state dicts, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP: gradients are reduced by FSDP itself

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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_gradients(self, model: torch.nn.Module) -> None:
        if self.world == 1 or self.sharded:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world


def setup(device: torch.device, fsdp: bool = False) -> Dist:
    """Join the process group when launched with several processes (or to shard on one); else a no-op."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()  # sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not fsdp:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world == 1:  # FSDP on one device (for its mixed precision): a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), sharded=fsdp)


def shard(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 in place: every decoder layer (the model's `_no_split_modules`) is one unit, the root holds the rest.
    Forward and backward run in compute_dtype, gradients are reduced in float32, master weights stay as loaded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full (compute-dtype) weights on every rank for the duration: one collective all-gather on entry, then forward
    passes run without communication, so `generate` may take a different number of steps on each rank. Nested
    uses are free, so a caller may gather once on all ranks and let one rank sample alone inside."""
    units = _fsdp_modules(model)
    if not units or getattr(model, "_klrl_gathered", False):  # not sharded, or already inside: re-entrant
        yield
        return
    model._klrl_gathered = True
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        model._klrl_gathered = False
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # fully_shard's default for root vs layers


def state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state. Collective under FSDP: every rank must call it."""
    if not _fsdp_modules(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_state_dicts(model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of `state_dicts`; every rank passes the full state read from the checkpoint."""
    if not _fsdp_modules(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def local_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
