"""Data parallelism: one update on 2 gloo processes equals the single-process update on the same global batch."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from klrl.config import kl_spec, pg_spec
from klrl.generation import make_generator
from klrl.distributed import Dist
from klrl.models import load_model
from klrl.rundir import read_json, read_metrics
from klrl.tasks import TASKS
from klrl.trainer import Batch, collect, update

from conftest import FAST, compose_cfg

OVERRIDES = [*FAST, "estimator=k3", "placement=both", "algo.prompts_per_step=4", "algo.agg=token_mean"]


def _setup(cfg):
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    return task, model, tok


def _one_update(cfg, model, batch, dist):
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rec = update(batch, cfg, model, ref, opt, sched, kl_spec(cfg), pg_spec(cfg), dist)
    return rec, {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, batch_path, out_path, cache):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KLRL_CACHE=cache)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = compose_cfg(*OVERRIDES)
    _, model, _ = _setup(cfg)
    full: Batch = torch.load(batch_path, weights_only=False)
    n = len(full.rewards) // world
    part = slice(rank * n, (rank + 1) * n)
    shard = Batch(full.rollout.select(part), full.rewards[part], full.gen_time)
    rec, grads = _one_update(cfg, model, shard, Dist(rank, world))
    if rank == 0:
        torch.save({"rec": rec, "grads": grads, "params": model.state_dict()}, out_path)
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_update_equals_single_process(tmp_path):
    cfg = compose_cfg(*OVERRIDES)
    task, model, tok = _setup(cfg)
    batch = collect(0, cfg, make_generator(cfg, model, tok), tok, task)
    assert len(batch.rewards) == 16 and batch.rollout.response_mask.sum(-1).std() > 0  # ragged lengths matter
    torch.save(batch, tmp_path / "batch.pt")
    rec1, grads1 = _one_update(cfg, model, batch, Dist())

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "batch.pt"), str(tmp_path / "dp.pt"), os.environ["KLRL_CACHE"]),
             nprocs=2, join=True)
    dp = torch.load(tmp_path / "dp.pt", weights_only=False)
    for name, g in grads1.items():
        assert torch.allclose(dp["grads"][name], g, rtol=1e-5, atol=1e-7), name
    for name, p in model.state_dict().items():
        assert torch.allclose(dp["params"][name], p, rtol=1e-5, atol=1e-7), name
    for key in ("reward", "kl/exact", "kl/k3", "entropy", "loss", "grad_norm"):
        assert abs(dp["rec"][key] - rec1[key]) < 1e-5 * max(1, abs(rec1[key])), key


def test_torchrun_two_processes_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "klrl", "train", *OVERRIDES, "steps=2", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(run / "summary.json")["status"] == "completed"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]
