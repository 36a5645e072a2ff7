"""The real asynchronous pipeline: bounded staleness, faithful behaviour log-probs, agreement with the simulated lag
when timing is forced, and no generator process left behind after an error, Ctrl-C or a killed trainer."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import klrl.training.pipeline
import klrl.training.trainer
from klrl.sampling.generation import make_generator
from klrl.models.registry import load_model
from klrl.training.pipeline import Pipeline, PipelineError
from klrl.runs.rundir import SUMMARY, read_json, read_metrics
from klrl.tasks import TASKS
from klrl.sampling.batch import behaviour_logprobs, collect
from klrl.training.trainer import train

from conftest import FAST, compose_cfg
from test_train_e2e import stable

BASE = [*FAST, "algo.is_truncate=8"]
PIPE = [*BASE, "async_mode=pipeline"]
# k1 in the loss moves the policy on every batch, so stale rollouts are visibly off-policy.
MOVING = ["estimator=k1", "placement=both", "optim.lr=1e-2"]


def proc_state(pid: int) -> str | None:
    """The /proc state letter, or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")  # a zombie has exited; only its parent's wait() is missing


def children(pid: int) -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def wait_gone(pids, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def pipelines(monkeypatch) -> list:
    """Every Pipeline the trainer creates, to look at its generator process afterwards."""
    made = []

    class Recorded(Pipeline):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(klrl.training.pipeline, "Pipeline", Recorded)
    return made


def slow_update(monkeypatch, delay: float) -> None:
    real = klrl.training.trainer.update

    def update(*a, **kw):
        time.sleep(delay)
        return real(*a, **kw)

    monkeypatch.setattr(klrl.training.trainer, "update", update)


@pytest.mark.parametrize("start", [0, 5])  # 5: a resumed run, whose current weights are version 5
def test_batches_come_from_the_snapshot_they_name(one_thread, start):
    cfg = compose_cfg(*PIPE, "async_level=1")
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    snapshots = {start: copy.deepcopy(model)}
    pipe = Pipeline(cfg, model, start_step=start)
    try:
        seen = []
        for step in range(start, start + 3):
            batch = pipe.get(step)
            seen.append(batch.staleness)
            behaviour = snapshots[step - batch.staleness]
            want = collect(step, cfg, make_generator(cfg, behaviour, tok), tok, task)
            assert torch.equal(batch.rollout.input_ids, want.rollout.input_ids)
            assert torch.equal(batch.rewards, want.rewards)
            torch.testing.assert_close(batch.old_logp, behaviour_logprobs(behaviour, want, len(want.rewards)))
            with torch.no_grad():  # a stand-in optimizer step that changes what the policy samples
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            snapshots[step + 1] = copy.deepcopy(model)
            pipe.publish(step + 1, model)
        assert seen[0] == 0 and all(s in (0, 1) for s in seen)
        with pytest.raises(PipelineError, match=f"asked for step {start + 7}"):
            pipe.get(start + 7)
    finally:
        pipe.close()
    assert not alive(pipe.pid)


def test_never_trains_on_data_staler_than_k(tmp_path):
    assert train(compose_cfg(*PIPE, "async_level=2", "steps=8"), tmp_path) == "completed"
    recs = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 9))
    staleness = [r["staleness"] for r in recs]
    assert staleness[0] == 0 and all(0 <= s <= 2 for s in staleness) and max(staleness) > 0, staleness
    for r in recs:
        assert r["time/wait"] >= 0 and r["time/publish"] >= 0 and r["time/step"] >= r["time/wait"]


def test_matches_the_simulated_lag_when_training_is_slow(tmp_path, monkeypatch, one_thread):
    # With generation much faster than a training step, the generator always waits for version s - k and then
    # samples step s from it: the simulated ring's staleness, with the same weights and the same seeds.
    lagged = [*BASE, *MOVING, "async_level=2", "steps=5"]
    train(compose_cfg(*lagged, "async_mode=sim"), tmp_path / "sim")
    slow_update(monkeypatch, 1.0)
    train(compose_cfg(*lagged, "async_mode=pipeline"), tmp_path / "pipe")
    sim, pipe = (stable(read_metrics(tmp_path / n)) for n in ("sim", "pipe"))
    assert [r.get("staleness") for r in pipe] == [r.get("staleness") for r in sim]
    assert [r["staleness"] for r in pipe if r["kind"] == "train"] == [0, 1, 2, 2, 2]
    assert pipe == sim
    assert any(abs(r["ratio/mean"] - 1) > 1e-6 for r in pipe if r["kind"] == "train")


def test_generator_is_gone_after_a_trainer_error(tmp_path, monkeypatch, pipelines):
    real, calls = klrl.training.trainer.update, []

    def update(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom at step 2")
        return real(*a, **kw)

    monkeypatch.setattr(klrl.training.trainer, "update", update)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose_cfg(*PIPE, "async_level=2", "steps=6"), tmp_path)
    (pipe,) = pipelines
    assert not alive(pipe.pid)
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2]


def test_generator_failure_reaches_the_trainer_with_its_traceback():
    cfg = compose_cfg(*PIPE, "async_level=1")
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, _ = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    cfg.task.name = "no-such-task"  # fails only in the generator, which rebuilds the task from the config
    pipe = Pipeline(cfg, model, start_step=0)
    try:
        with pytest.raises(PipelineError, match=r"(?s)failed at step 0.*Traceback.*KeyError: 'no-such-task'"):
            pipe.get(0)
    finally:
        pipe.close()
    assert not alive(pipe.pid)


def test_a_killed_generator_is_reported(one_thread):
    cfg = compose_cfg(*PIPE, "async_level=1")
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, _ = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    pipe = Pipeline(cfg, model, start_step=0)
    try:
        pipe.get(0)
        os.kill(pipe.pid, signal.SIGKILL)
        with pytest.raises(PipelineError, match="died"):
            for step in range(1, 4):  # a batch already in the pipe may still arrive
                pipe.publish(step, model)
                pipe.get(step)
    finally:
        pipe.close()


def sigint_default() -> None:
    """SIGINT's default action in the child, as in a job in a terminal's foreground. A test suite started in the
    background of a script (`python -m pytest &`) inherits SIGINT ignored (POSIX: asynchronous commands without
    job control), and so would every process it starts: Ctrl-C could not reach them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["sigint-group", "sigint-parent", "sigkill-parent"])
def test_no_orphans_after_ctrl_c_or_kill(tmp_path, how):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "klrl", "train", *PIPE, "async_level=2", "steps=500", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, stdout=log, stderr=log, start_new_session=True, env={**os.environ}, preexec_fn=sigint_default,
    )
    try:
        deadline = time.monotonic() + 180
        while not any(r["kind"] == "train" for r in read_metrics(run_dir)):
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.2)
        kids = children(proc.pid)
        assert any("spawn_main" in c for c in kids.values()), kids  # the generator
        if how == "sigint-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT if how == "sigint-parent" else signal.SIGKILL)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not wait_gone(kids), {p: kids[p] for p in kids if alive(p)}
    if how == "sigkill-parent":
        assert rc == -signal.SIGKILL
        return
    assert rc == 1, (tmp_path / "stderr").read_text()[-3000:]
    summary = read_json(run_dir / SUMMARY)
    assert summary["status"] == "failed" and summary["error"].startswith("KeyboardInterrupt"), summary
