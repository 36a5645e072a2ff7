"""What a run trains, built from its config: the policy, the frozen reference, the optimizer and schedule, the
ranks, the lag ring; restored from a checkpoint, saved to one; and the batch source it trains on."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from klrl.errors import ConfigError
from klrl.models.registry import DTYPES, load_model
from klrl.runs import checkpoint
from klrl.runs.rundir import RunDir, comparable, set_rng_state
from klrl.tasks import TASKS
from klrl.training.distributed import Dist, load_state_dicts, local_device, setup, shard, state_dicts
from klrl.training.lag import SnapshotRing
from klrl.training.sources import BatchSource, Lagged, OnPolicy, Pipelined

log = logging.getLogger(__name__)


@dataclass
class Parts:
    model: torch.nn.Module
    ref: torch.nn.Module
    tokenizer: object
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: Dist
    ring: SnapshotRing | None  # the lagged sampler's snapshots (async_level > 0, async_mode=sim)


def build(cfg) -> Parts:
    device = local_device(cfg.device)
    if device.type == "cpu" and cfg.model.get("cpu_threads"):
        torch.set_num_threads(cfg.model.cpu_threads)
    dist = setup(device, cfg.model.fsdp)
    if cfg.algo.prompts_per_step % dist.world:
        raise ConfigError(f"algo.prompts_per_step={cfg.algo.prompts_per_step} must be divisible by the {dist.world} "
                          "ranks")
    if cfg.async_mode == "pipeline" and dist.world > 1:
        raise ConfigError("async_mode=pipeline runs with a single trainer process; use async_mode=sim with several ranks")
    torch.manual_seed(cfg.seed)
    if not cfg.progress:  # transformers' own bars (loading weights) follow the run's progress=false too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tokenizer = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    model.to(device)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    lagged = cfg.async_level > 0 and cfg.async_mode == "sim"
    behaviour = copy.deepcopy(ref) if lagged else None  # the lag ring's sampler; copied before FSDP, which can't be
    if cfg.model.fsdp:  # the optimizer must be built on the sharded parameters
        compute = DTYPES[cfg.model.dtype]
        shard(model, device, compute)
        for frozen in (ref, behaviour):  # no master copy needed: held in the compute dtype
            if frozen is not None:
                shard(frozen.to(compute), device, compute)
    elif cfg.model.dtype in ("bfloat16", "float16") and dist.main:
        log.warning("training in pure %s: AdamW updates smaller than ~0.4%% of a weight are rounded away; "
                    "model.fsdp=true model.param_dtype=float32 keeps float32 master weights", cfg.model.dtype)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    warmup = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ring = SnapshotRing(behaviour, cfg.async_level) if lagged else None
    return Parts(model, ref, tokenizer, task, optimizer, scheduler, dist, ring)


def restore(cfg, run: RunDir, p: Parts) -> int:
    """Load the run's last good checkpoint (the previous one if the last is unreadable); the step to start at."""
    loaded = checkpoint.load(run)
    for why in loaded.skipped:
        log.warning("%s: %s", run.path, why)
    if loaded.state is None:
        return 0
    ckpt = loaded.state
    load_state_dicts(p.model, p.optimizer, ckpt["model"], ckpt["optimizer"])
    p.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    if p.ring is not None:  # under FSDP each rank saved its own shard of every snapshot
        d = p.dist
        p.ring.load_state(checkpoint.load_ring_shard(run, ckpt["step"], d.rank, d.world, ckpt["ring_shards"])
                          if d.sharded else ckpt["ring"])
    log.info("resumed from step %d (%s)", ckpt["step"], loaded.path.name)
    return int(ckpt["step"])


def save(cfg, run: RunDir, p: Parts, step: int) -> None:
    model_state, optim_state = state_dicts(p.model, p.optimizer)  # collective under FSDP
    extra: dict = {"config": comparable(cfg)}  # self-describing; the drift check reads .hydra/config.yaml
    if p.ring is not None and p.dist.sharded:
        checkpoint.save_ring_shard(run, step, p.dist.rank, p.dist.world, p.ring.state())
        p.dist.barrier()  # every shard is on disk before the checkpoint that refers to them
        extra["ring_shards"] = p.dist.world
    elif p.ring is not None:
        extra["ring"] = p.ring.state()
    if p.dist.main:
        checkpoint.save(run, step, model_state, optim_state, p.scheduler, extra)


def make_source(cfg, p: Parts, generator, start: int) -> BatchSource:
    if cfg.async_mode == "pipeline":
        return Pipelined(cfg, p.model, start)
    if p.ring is not None:
        return Lagged(cfg, p.model, generator, p.tokenizer, p.task, p.dist, p.ring)
    return OnPolicy(cfg, p.model, generator, p.tokenizer, p.task, p.dist)
