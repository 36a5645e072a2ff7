"""Data parallelism and FSDP: one update on 2 gloo processes equals the single-process update on the same global
batch; FSDP runs resume exactly; float32 master weights keep the updates that bfloat16 weights round away."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from klrl.config.specs import kl_spec, pg_spec
from klrl.training.distributed import Dist, shard, state_dicts
from klrl.sampling.generation import make_generator
from klrl.models.registry import load_model
from klrl.runs.rundir import read_json, read_metrics
from klrl.tasks import TASKS
from klrl.sampling.batch import Batch, collect
from klrl.training.update import update

from conftest import FAST, compose_cfg

# One-digit sums after a longer warm start: some rewards are 1, so the policy-gradient term is not zero.
OVERRIDES = [*FAST, "estimator=k3", "placement=both", "algo.prompts_per_step=4", "algo.agg=token_mean",
             "task.digits=1", "task.ood_digits=2", "model.warmstart.steps=150"]


def _setup(cfg):
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    return task, model, tok


def _one_update(cfg, model, batch, dist, fsdp=False):
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference apart from the policy, so that the KL terms have a gradient too
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if fsdp:
        shard(model, torch.device("cpu"), torch.float32)
        shard(ref, torch.device("cpu"), torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rec = update(batch, cfg, model, ref, opt, sched, kl_spec(cfg), pg_spec(cfg), dist)
    return rec, opt


def _worker(rank, world, port, batch_path, out_path, cache, fsdp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KLRL_CACHE=cache)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = compose_cfg(*OVERRIDES)
    _, model, _ = _setup(cfg)
    full: Batch = torch.load(batch_path, weights_only=False)
    n = len(full.rewards) // world
    part = slice(rank * n, (rank + 1) * n)
    mine = Batch(full.rollout.select(part), full.rewards[part], full.gen_time)
    rec, opt = _one_update(cfg, model, mine, Dist(rank, world, sharded=fsdp), fsdp)
    params, _ = state_dicts(model, opt)  # gathered: under FSDP each rank holds half of every tensor
    if rank == 0:
        torch.save({"rec": rec, "params": params}, out_path)
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["dp", "fsdp"])
def test_two_rank_update_equals_single_process(tmp_path, fsdp):
    cfg = compose_cfg(*OVERRIDES)
    task, model, tok = _setup(cfg)
    before = copy.deepcopy(model.state_dict())
    batch = collect(0, cfg, make_generator(cfg, model, tok), tok, task)
    assert len(batch.rewards) == 16 and batch.rollout.response_mask.sum(-1).std() > 0  # ragged lengths matter
    assert 0 < batch.rewards.mean() < 1  # the policy-gradient term is live
    torch.save(batch, tmp_path / "batch.pt")
    rec1, _ = _one_update(cfg, model, batch, Dist())
    assert rec1["grad_norm"] > 0

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "batch.pt"), str(tmp_path / "two.pt"),
                            os.environ["KLRL_CACHE"], fsdp), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    moved = 0
    for name, p in model.state_dict().items():
        assert torch.allclose(two["params"][name], p, rtol=1e-5, atol=1e-7), name
        moved += not torch.equal(p, before[name])
    assert moved > 0.9 * len(before)  # the comparison is not between two untouched models
    for key in ("reward", "kl/exact", "kl/k3", "entropy", "loss", "grad_norm"):
        assert abs(two["rec"][key] - rec1[key]) < 1e-5 * max(1, abs(rec1[key])), key


def test_torchrun_two_processes_end_to_end(tmp_path):
    """From an empty cache: rank 0 builds the warm start while rank 1 waits (racing, rank 1 once cached a
    checkpoint without weights, since save_pretrained writes them on rank 0 only)."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "klrl", "train", *OVERRIDES, "steps=2", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KLRL_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(run / "summary.json")["status"] == "completed"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]
    (built,) = (cache / "warmstart").iterdir()
    assert (built / "model.safetensors").is_file() and (built / "config.json").is_file()


def _torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "klrl", "train", *OVERRIDES, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("lag", [0, 2])
def test_fsdp_run_resumes_exactly_and_matches_data_parallel(tmp_path, lag):
    """3 FSDP steps == 2 FSDP steps, then resume=true to 3; and == 3 plain data-parallel steps (float32). With
    lag 2 the ring of snapshots is sharded too, one file per rank beside each checkpoint."""
    train = lambda d: [r for r in read_metrics(d) if r["kind"] == "train"]
    lagged = ["async_level=2", "algo.is_truncate=8"] if lag else []
    _torchrun(tmp_path, *lagged, "model.fsdp=true", "steps=3", f"hydra.run.dir={tmp_path / 'whole'}")
    _torchrun(tmp_path, *lagged, "model.fsdp=true", "steps=2", "ckpt_every=1", f"hydra.run.dir={tmp_path / 'cut'}")
    _torchrun(tmp_path, *lagged, "model.fsdp=true", "steps=3", "resume=true", f"hydra.run.dir={tmp_path / 'cut'}")
    _torchrun(tmp_path, *lagged, "steps=3", f"hydra.run.dir={tmp_path / 'dp'}")
    whole, cut, dp = (train(tmp_path / d) for d in ("whole", "cut", "dp"))
    assert [r["step"] for r in cut] == [1, 2, 3] and read_json(tmp_path / "cut" / "summary.json")["status"] == "completed"
    assert any(r["grad_norm"] > 0 for r in whole)
    assert [r["staleness"] for r in whole] == [0, 1, 2][: 3 if lag else 0] + [0, 0, 0][: 0 if lag else 3]
    keys = ("reward", "loss", "kl/exact", "kl/k3", "entropy", "grad_norm", "response_length")
    for a, b, c in zip(whole, cut, dp):
        for k in keys:
            assert a[k] == b[k], (a["step"], k)  # resumed: the very same numbers
            assert abs(a[k] - c[k]) < 1e-4 * max(1, abs(c[k])), (a["step"], k)
    ckpt = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    model = _setup(compose_cfg(*OVERRIDES))[1]
    assert set(ckpt["model"]) == set(model.state_dict())  # a full state dict: `klrl eval` and 1-rank resumes load it
    shards = sorted(p.name for p in (tmp_path / "cut").glob("ring-*.pt"))
    assert shards == ([f"ring-step{s}-rank{r}of2.pt" for s in (2, 3) for r in (0, 1)] if lag else [])


def test_fsdp_with_activation_checkpointing_computes_the_same_steps(tmp_path):
    train = lambda d: [r for r in read_metrics(d) if r["kind"] == "train"]
    _torchrun(tmp_path, "model.fsdp=true", "steps=2", f"hydra.run.dir={tmp_path / 'plain'}")
    _torchrun(tmp_path, "model.fsdp=true", "model.gradient_checkpointing=true", "steps=2", f"hydra.run.dir={tmp_path / 'gc'}")
    for a, b in zip(train(tmp_path / "plain"), train(tmp_path / "gc"), strict=True):
        for k in ("loss", "grad_norm", "kl/exact", "reward"):
            assert abs(a[k] - b[k]) < 1e-6 * max(1, abs(a[k])), (a["step"], k)


def _precision_worker(rank, out_path, cache, fsdp):
    os.environ["KLRL_CACHE"] = cache
    cfg = compose_cfg(*OVERRIDES, "optim.lr=1e-6", *(["model.fsdp=true", "model.param_dtype=float32"] if fsdp else []),
                      "model.dtype=bfloat16")
    from klrl.training.distributed import setup
    from klrl.models.registry import load_model

    dist = setup(torch.device("cpu"), cfg.model.fsdp)  # FSDP on one process: a group of one
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    ref = copy.deepcopy(model).requires_grad_(False)
    if fsdp:
        shard(model, torch.device("cpu"), torch.bfloat16)
        shard(ref, torch.device("cpu"), torch.bfloat16)
    before = {k: v.float().clone() for k, v in state_dicts(model, torch.optim.SGD(model.parameters(), lr=1))[0].items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.0)  # moves only what has a gradient
    batch = collect(0, cfg, make_generator(cfg, model, tok), tok, task, dist.rank, dist.world)
    update(batch, cfg, model, ref, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), kl_spec(cfg), pg_spec(cfg), dist)
    after = state_dicts(model, opt)[0]
    moved = sum(int((after[k].float() != v).sum()) for k, v in before.items())
    total = sum(v.numel() for v in before.values())
    torch.save({"moved": moved / total, "dtype": str(next(iter(after.values())).dtype)}, out_path)


def test_float32_master_weights_keep_the_updates_bfloat16_loses(tmp_path):
    """At lr 1e-6 an AdamW step moves a weight by ~1e-6, far below bfloat16's resolution at |w| ~ 0.1."""
    out = {}
    for fsdp in (False, True):
        mp.spawn(_precision_worker, args=(str(tmp_path / f"{fsdp}.pt"), os.environ["KLRL_CACHE"], fsdp), nprocs=1, join=True)
        out[fsdp] = torch.load(tmp_path / f"{fsdp}.pt")
    assert out[False]["dtype"] == "torch.bfloat16" and out[True]["dtype"] == "torch.float32"
    assert out[False]["moved"] < 0.05  # pure bf16: the update is rounded away
    assert out[True]["moved"] > 0.5  # fp32 masters under FSDP's bf16 compute: it lands
