"""Simulated asynchronous lag: deterministic, lag 0 is the on-policy trainer, ratios are 1 on-policy."""

from __future__ import annotations

import copy

import torch

from klrl.config.specs import kl_spec, pg_spec
from klrl.sampling.generation import make_generator
from klrl.training.lag import SnapshotRing
from klrl.models.registry import load_model
from klrl.runs.rundir import read_metrics
from klrl.tasks import TASKS
from klrl.sampling.batch import behaviour_logprobs, collect
from klrl.training.trainer import train
from klrl.training.update import update

from conftest import FAST, compose_cfg
from test_train_e2e import stable

# k1 in the loss has a non-zero gradient on every batch (zero only in expectation), so the policy moves even
# while the barely warm-started model earns no reward.
LAGGED = [*FAST, "steps=6", "async_level=3", "algo.is_truncate=8", "estimator=k1", "placement=both", "optim.lr=1e-2"]


def test_simulated_lag_is_deterministic_and_bounded(tmp_path):
    for name in ("a", "b"):
        train(compose_cfg(*LAGGED), tmp_path / name)
    a, b = (stable(read_metrics(tmp_path / n)) for n in ("a", "b"))
    assert a == b
    train_recs = [r for r in a if r["kind"] == "train"]
    assert [r["staleness"] for r in train_recs] == [0, 1, 2, 3, 3, 3]
    assert any(abs(r["ratio/mean"] - 1) > 1e-6 for r in train_recs[1:])  # stale rollouts are off-policy


def test_lag_zero_through_the_ring_equals_the_on_policy_step():
    cfg = compose_cfg(*FAST, "estimator=k3", "placement=both")
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    models = [model, copy.deepcopy(model)]
    recs = []
    for i, m in enumerate(models):
        if i == 0:
            batch = collect(0, cfg, make_generator(cfg, m, tok), tok, task)
        else:
            ring = SnapshotRing(copy.deepcopy(m), lag=0)
            ring.push(m)
            behaviour, staleness = ring.policy()
            assert staleness == 0
            batch = collect(0, cfg, make_generator(cfg, behaviour, tok), tok, task)
            batch.old_logp = behaviour_logprobs(behaviour, batch, len(batch.rewards))
        ref = copy.deepcopy(m).eval().requires_grad_(False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        recs.append(update(batch, cfg, m, ref, opt, sched, kl_spec(cfg), pg_spec(cfg)))
    drop = ("time/", "tokens_per_s/")
    assert {k: v for k, v in recs[0].items() if not k.startswith(drop)} == {k: v for k, v in recs[1].items() if not k.startswith(drop)}
    for (n, p0), p1 in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p0, p1), n


def test_importance_ratios_are_one_on_policy(tmp_path):
    train(compose_cfg(*FAST, "steps=3", "estimator=k3", "placement=loss"), tmp_path)
    for r in read_metrics(tmp_path):
        if r["kind"] == "train":
            assert r["ratio/mean"] == 1.0 and r["ratio/max"] == 1.0 and r["is/ess"] == 1.0 and r["staleness"] == 0
