"""End to end: every KL cell trains on the tiny model; resume, determinism, divergence, failure, Hydra habits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from klrl.runs.rundir import CHECKPOINT, SUMMARY, read_json, read_metrics
from klrl.training.trainer import train

from conftest import FAST, compose_cfg, run_klrl

CELLS = [
    "estimator=none",
    *[f"estimator={e} placement={p}" for e in ("k1", "k2", "k3") for p in ("reward", "loss", "both")],
    "estimator=k1 placement=reward placement.reward_form=togo",
    "estimator=k3 placement=both placement.reward_form=togo",
    "estimator=k3 placement=loss placement.loss_is_weight=true",
    "estimator=k1 placement=reward placement.reward_is_weight=true",
    "estimator=k3 placement=loss estimator.clamp_log_ratio=5 estimator.clamp_value=2",
    "estimator=k3+ placement=loss",
    "algo=grpo estimator=k3 placement=loss",
    "algo=dr_grpo estimator=k1 placement=reward",
    "algo=grpo algo.updates_per_batch=2 algo.ratio_clip=0.2 estimator=k3 placement=loss placement.loss_is_weight=true",
    "algo.micro_batch_size=8 estimator=k1 placement=both",
]
VOLATILE = ("time/", "tokens_per_s/")


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_trains(cell, tmp_path):
    cfg = compose_cfg(*FAST, "steps=2", "eval.at_start=false", *cell.split())
    assert train(cfg, tmp_path) == "completed"
    summary = read_json(tmp_path / SUMMARY)
    assert summary["status"] == "completed" and summary["step"] == 2
    train_recs = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2]
    for r in train_recs:
        for key in ("reward", "accuracy", "kl/k1", "kl/k2", "kl/k3", "kl/exact", "entropy", "grad_norm",
                    "response_length", "time/step", "tokens_per_s/generate", "tokens_per_s/train"):
            assert key in r and r[key] == r[key], key  # present and not NaN
    assert "eval/id/pass@1" in summary["final_eval"] and "eval/ood/greedy_hi" in summary["final_eval"]
    assert (tmp_path / CHECKPOINT).exists()


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = compose_cfg(*FAST, "steps=3", f"seed={seed}", "estimator=k3", "placement=loss")
        train(cfg, tmp_path / name)
        runs[name] = stable(read_metrics(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = [*FAST, "steps=12", "ckpt_every=2", "eval.every=4", "estimator=k1", "placement=both"]
    run_klrl("train", *args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path, check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "klrl", "train", *args, f"hydra.run.dir={killed}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while not (killed / CHECKPOINT).exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(killed / SUMMARY)["status"] == "running"

    run_klrl("train", *args, "resume=true", f"hydra.run.dir={killed}", cwd=tmp_path, check=True)
    assert stable(read_metrics(killed)) == stable(read_metrics(tmp_path / "full"))
    assert read_json(killed / SUMMARY)["status"] == "completed"


def test_resume_refuses_a_changed_config(tmp_path):
    run_klrl("train", *FAST, "steps=2", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=True)
    proc = run_klrl("train", *FAST, "steps=4", "beta=0.2", "resume=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "beta: 0.1 -> 0.2" in proc.stderr


def test_existing_run_is_refused_with_resume_false(tmp_path):
    """resume=auto (the default) continues a run (test below); resume=false refuses a directory that holds one."""
    first = run_klrl("train", *FAST, "steps=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=True)
    assert "Loading weights" not in first.stderr + first.stdout  # progress=false silences transformers' bars too
    before = (tmp_path / "metrics.jsonl").read_text()
    times = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in [tmp_path, *tmp_path.rglob("*")]}
    proc = run_klrl("train", *FAST, "steps=1", "resume=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "completed at step 1: resume=auto reports it and steps > 1 continues it" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before
    # refused: not even the directory's modification time moved (the writability probe puts it back)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in [tmp_path, *tmp_path.rglob("*")]} == times


def test_completed_run_with_resume_is_skipped(tmp_path):
    run_klrl("train", *FAST, "steps=2", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    proc = run_klrl("train", *FAST, "steps=2", "resume=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=True)
    assert "already completed" in proc.stdout + proc.stderr
    assert f"completed at step 2/2 already, nothing to do: {tmp_path}" in proc.stdout  # the report, no wall time
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_non_finite_loss_is_a_diverged_result(tmp_path, monkeypatch):
    import klrl.training.update as trainer_update

    real = trainer_update.policy_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if calls["n"] >= 3 else out

    monkeypatch.setattr(trainer_update, "policy_loss", poisoned)
    cfg = compose_cfg(*FAST, "steps=5", "eval.at_start=false")
    assert train(cfg, tmp_path) == "diverged"
    summary = read_json(tmp_path / SUMMARY)
    assert summary["status"] == "diverged" and summary["diverged_at"] == 3
    kinds = [(r["step"], r["kind"]) for r in read_metrics(tmp_path)]
    assert kinds == [(1, "train"), (2, "train"), (3, "diverged")]


def broken_cache(tmp_path):
    """A cache directory that passes validation (it can be written) but fails the run that uses it: its warmstart
    entry is a file, so the warm start cannot be stored there."""
    cache = tmp_path / "broken_cache"
    cache.mkdir()
    (cache / "warmstart").write_text("not a directory\n")
    return cache


def test_exception_is_a_failed_run_with_nonzero_exit(tmp_path):
    proc = run_klrl("train", *FAST, "steps=1", f"cache_dir={broken_cache(tmp_path)}", f"hydra.run.dir={tmp_path / 'r'}",
                    cwd=tmp_path)
    assert proc.returncode == 1
    summary = read_json(tmp_path / "r" / SUMMARY)
    assert summary["status"] == "failed" and "Error" in summary["error"]


BAD = [
    (["estimator=k9"], "estimator='k9' is not valid; choose from: abs, k1, k1+, k2, k3, k3+, none"),
    (["beta=-1"], "beta=-1.0 is not valid; it must be a finite number >= 0"),
    (["algo.group_size=1"], "algo.group_size=1 is too small for baseline rloo"),
    (["model=gpt5"], "model='gpt5' is not valid; choose from:"),
    (["task=nosuch"], "task='nosuch' is not valid; choose from:"),
    (["steps=abc"], "steps=abc is not valid; it must be an integer in 1.."),
    (["placement=warp"], "placement='warp' is not valid"),
    (["estimator=none", "beta=0.1"], "beta=0.1 with estimator=none would be ignored"),
    (["estimator=none", "placement=loss"], "placement=loss with estimator=none would be ignored"),
    (["placement=loss", "placement.reward_form=togo"], "placement.reward_form='togo' has no effect with placement=loss"),
    (["placement=reward", "placement.loss_is_weight=true"], "placement.loss_is_weight=True has no effect"),
    (["placement.reward_form=sum"], "placement.reward_form='sum' is not valid; choose from: seqsum, togo"),
    (["algo.baseline=ppo"], "algo.baseline='ppo' is not valid; choose from: rloo, grpo, dr_grpo, rloo_std, none"),
    (["algo.updates_per_batch=4"], "algo.updates_per_batch=4 needs algo.ratio_clip"),
    (["nosuchkey=1"], "nosuchkey"),
    (["task.eval_size=0"], "task.eval_size=0 is not valid; it must be an integer >= 1"),
    (["generation.backend=sglang"], "generation.backend='sglang' is not valid; choose from: hf, vllm"),
    (["generation.vllm.enforce_eager=true"], "generation.vllm.enforce_eager=True has no effect with generation.backend=hf"),
    (["-m", "estimator=k1,k9"], "estimator='k9' is not valid"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_clear_line_and_leaves_nothing(args, message, tmp_path):
    proc = run_klrl("train", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klrl: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_hydra_habits(tmp_path):
    cfg_job = run_klrl("train", "estimator=k3", "placement=loss", "--cfg", "job", cwd=tmp_path, check=True)
    assert "name: k3" in cfg_job.stdout and "name: loss" in cfg_job.stdout
    helped = run_klrl("train", "--help", cwd=tmp_path, check=True)
    assert "estimator" in helped.stdout and "placement" in helped.stdout
    run_klrl("train", "-m", *FAST, "steps=1", "estimator=k1,k3", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
             check=True)
    summaries = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2 and all("estimator=" in s for s in summaries)
    assert all(read_json(p)["status"] == "completed" for p in (tmp_path / "sweep").glob("*/summary.json"))


def test_run_directory_contents(tmp_path):
    run_klrl("train", *FAST[:-1], "steps=2", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=True)
    r = tmp_path / "r"
    assert (r / ".hydra" / "config.yaml").exists() and (r / ".hydra" / "overrides.yaml").exists()
    assert any((r / "tb").iterdir())
    import torch

    ckpt = torch.load(r / CHECKPOINT, weights_only=False)
    assert set(ckpt) >= {"step", "model", "optimizer", "scheduler", "rng", "config"} and ckpt["step"] == 2
    assert not [p for p in r.iterdir() if p.name.startswith(".") and p.name != ".hydra"]  # no temp files left
    assert json.loads((r / SUMMARY).read_text())["initial_eval"]["eval/id/pass@1"] >= 0


def test_a_failing_run_does_not_stop_a_local_sweep(tmp_path):
    import os

    sweep = tmp_path / "sweep"
    proc = run_klrl("train", "-m", *FAST, "steps=1", f"cache_dir={broken_cache(tmp_path)},{os.environ['KLRL_CACHE']}",
                    f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert proc.returncode != 0 and "run failed" in proc.stderr
    assert read_json(sweep / "0" / SUMMARY)["status"] == "failed"
    assert read_json(sweep / "1" / SUMMARY)["status"] == "completed"


def test_device_cuda_without_cuda_is_refused_up_front(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the check under test only exists where CUDA does not
    proc = run_klrl("train", "device=cuda", cwd=tmp_path)
    assert proc.returncode == 2 and "device=cuda but no CUDA device" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_sigusr2_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path):
    args = [*FAST, "steps=30", "ckpt_every=1000", "estimator=k3", "placement=loss"]
    run_klrl("train", *args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path, check=True)
    run = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "klrl", "train", *args, f"hydra.run.dir={run}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while not [r for r in read_metrics(run) if r["kind"] == "train"]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == 0
    import torch

    step = torch.load(run / CHECKPOINT, weights_only=False)["step"]
    assert 1 <= step < 30  # a checkpoint at the step it stopped, though ckpt_every is 1000
    assert read_json(run / SUMMARY)["status"] == "running" and read_json(run / SUMMARY)["step"] == step
    run_klrl("train", *args, "resume=true", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    assert stable(read_metrics(run)) == stable(read_metrics(tmp_path / "full"))


def test_finished_run_with_a_changed_config_is_refused(tmp_path):
    run_klrl("train", *FAST, "steps=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=True)
    proc = run_klrl("train", *FAST, "steps=1", "beta=0.3", "resume=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "beta: 0.1 -> 0.3" in proc.stderr
