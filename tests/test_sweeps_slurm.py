"""Sweeps on a real single-node SLURM cluster (klrl.testing.slurm_cluster): one job array per sweep, every run's
status reported, finished runs skipped on resubmission, a preempted run requeued and resumed exactly, by klrl's
launcher and by Hydra's stock submitit_slurm launcher alike.

The cluster fixture raises when the cluster cannot start, so these tests error (they never skip) without one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klrl.runs.rundir import METRICS, SUMMARY, read_json, read_metrics
from klrl.runs.status import collect
from klrl.testing.slurm_cluster import slurm_cluster  # noqa: F401

from conftest import FAST, run_klrl
from test_train_e2e import stable

pytestmark = pytest.mark.slow


def launcher(cluster) -> list[str]:
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20"]


def stock_launcher(cluster, name: str) -> list[str]:
    """hydra-submitit-launcher's own `submitit_slurm`, set up on the command line alone: no klrl launcher code runs."""
    return ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={cluster.partition}",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20", f"hydra.launcher.name={name}",
            # Its default, ${hydra.sweep.dir}/.submitit/%j, is keyed by job id alone: a sweep dir reused on a fresh
            # cluster (job ids restart at 1) would hand back stale results. One folder per submission:
            "hydra.launcher.submitit_folder='${hydra.sweep.dir}/.submitit/${now:%Y-%m-%d_%H-%M-%S-%f}/%j'",
            # sbatch --requeue: requeueable even where the cluster's JobRequeue default is 0 (this one's is 1).
            "+hydra.launcher.additional_parameters.requeue=true"]


def submissions(sweep: Path) -> list[dict]:
    path = sweep / "submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sacct(array: str) -> dict[str, str]:
    """Task id -> state, once the accounting database has heard of every end (it hears asynchronously)."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State"],
                             capture_output=True, text=True, check=True).stdout
        rows = dict(line.split("|") for line in out.split())
        if all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))


def test_train_multirun_submits_one_array(slurm_cluster, tmp_path):  # noqa: F811
    sweep = tmp_path / "multirun"
    t0 = time.monotonic()
    proc = run_klrl("train", "-m", "estimator=k1,k3", "placement=reward,loss", *launcher(slurm_cluster),
                    f"hydra.sweep.dir={sweep}", *FAST, "steps=1", cwd=tmp_path, timeout=900)
    print(f"4-run array: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [sub] = submissions(sweep)
    ids = [r["job_id"] for r in sub["runs"]]
    array = ids[0].split("_")[0]
    assert sorted(ids) == [f"{array}_{i}" for i in range(4)]  # one array, one task per grid point
    assert sacct(array) == {i: "COMPLETED" for i in ids}
    assert len(run_dirs(sweep)) == 4
    assert all(read_json(r / SUMMARY)["status"] == "completed" for r in run_dirs(sweep))
    assert "4 runs: 4 completed" in proc.stdout


def test_tiny_grid_runs_as_one_array_and_resubmission_skips_it(slurm_cluster, tmp_path):  # noqa: F811
    sweep = tmp_path / "tiny"
    args = ["sweep", "tiny", *launcher(slurm_cluster), f"hydra.sweep.dir={sweep}", *FAST, "steps=2"]
    t0 = time.monotonic()
    proc = run_klrl(*args, cwd=tmp_path, timeout=1200)
    print(f"tiny grid, 10-task array: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [sub] = submissions(sweep)
    ids = [r["job_id"] for r in sub["runs"]]
    array = ids[0].split("_")[0]
    assert len(ids) == 10 and sorted(ids, key=lambda i: int(i.split("_")[1])) == [f"{array}_{i}" for i in range(10)]
    assert sacct(array) == {i: "COMPLETED" for i in ids}
    runs = run_dirs(sweep)
    assert len(runs) == 10 and {re.search(r"estimator=(\w+)", r.name).group(1) for r in runs} == {"k1", "k3", "none"}
    assert all(read_json(r / SUMMARY)["status"] == "completed" for r in runs)
    assert "10 runs: 10 completed" in proc.stdout

    status = run_klrl("status", str(sweep), cwd=tmp_path, check=True).stdout
    assert "10 runs: 10 completed" in status and f"{array}_9" in status

    before = {r: (r / METRICS).read_bytes() for r in runs}
    t0 = time.monotonic()
    again = run_klrl(*args, cwd=tmp_path, timeout=600)
    print(f"resubmission of a finished grid: {time.monotonic() - t0:.1f} s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 of 10 runs already finished" in again.stdout and "nothing to submit" in again.stdout
    assert {r: (r / METRICS).read_bytes() for r in runs} == before  # nothing retrained
    assert len(submissions(sweep)) == 1  # nothing submitted


def test_a_failing_run_is_reported_with_the_others_and_resubmitted_alone(slurm_cluster, tmp_path):  # noqa: F811
    grid = tmp_path / "with_failure.yaml"
    # Passes every check before submission (the cache directory is writable); fails in the job: the warm-start
    # cache's own folder inside it is a file.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "warmstart").write_text("not a directory")
    grid.write_text("grid:\n"
                    "  - {estimator: [k1, k3], placement: loss}\n"
                    f"  - {{estimator: k1, placement: reward, seed: 9, cache_dir: {cache}}}\n")
    sweep = tmp_path / "fail"
    args = ["sweep", str(grid), *launcher(slurm_cluster), f"hydra.sweep.dir={sweep}", *FAST, "steps=2"]
    t0 = time.monotonic()
    proc = run_klrl(*args, cwd=tmp_path, timeout=900)
    print(f"3-run array with a failure: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.rindex("RUN "):]
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()[1:4]}
    assert set(rows) == {"estimator=k1 placement=loss", "estimator=k3 placement=loss",
                         f"estimator=k1 placement=reward seed=9 cache_dir={cache}"}
    bad = rows[f"estimator=k1 placement=reward seed=9 cache_dir={cache}"]
    assert " failed " in bad and "FileExistsError" in bad
    assert all(" completed " in r for k, r in rows.items() if "seed=9" not in k)
    assert "3 runs: 2 completed, 1 failed" in proc.stdout
    assert "klrl: 1 of 3 runs did not finish" in proc.stderr

    good = [r for r in run_dirs(sweep) if "seed=9" not in r.name]
    before = {r: (r / METRICS).read_bytes() for r in good}
    again = run_klrl(*args, cwd=tmp_path, timeout=900)
    assert again.returncode == 1
    assert "2 of 3 runs already finished" in again.stdout and "submitted 1 runs" in again.stdout
    assert len(submissions(sweep)[-1]["runs"]) == 1 and "seed=9" in submissions(sweep)[-1]["runs"][0]["run"]
    assert {r: (r / METRICS).read_bytes() for r in good} == before


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _summary(run: Path) -> dict:
    try:
        return read_json(run / SUMMARY)
    except (OSError, ValueError):
        return {}


def test_no_wait_status_and_requeue_resume_exactly(slurm_cluster, tmp_path):  # noqa: F811
    # Submitted without resume=true (klrl train -m): resume=auto, the default, is what continues the requeued run.
    common = ["train", "-m", "estimator=k3", "placement=loss", "seed=3", *FAST, "steps=80", "ckpt_every=2",
              *launcher(slurm_cluster), "hydra.launcher.wait=false"]
    sweep, ref_sweep = tmp_path / "requeue", tmp_path / "reference"
    t0 = time.monotonic()
    proc = run_klrl(*common, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    submit_s = time.monotonic() - t0
    print(f"non-blocking submission returned in {submit_s:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sub] = submissions(sweep)
    job_id = sub["runs"][0]["job_id"]
    assert f"sweep dir: {sweep}" in proc.stdout and job_id in proc.stdout

    early = json.loads(run_klrl("status", str(sweep), "--json", cwd=tmp_path, check=True).stdout)["runs"]
    assert len(early) == 1 and early[0]["job_id"] == job_id and early[0]["status"] in ("pending", "running")

    run = sweep / sub["runs"][0]["run"]
    step = _wait_for(lambda: (_summary(run).get("step") or 0) >= 6 and _summary(run)["step"], 600,
                     "the run to pass step 6 (checkpoints every 2)")
    assert step < 80, "the run finished before it could be preempted; make it longer"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before a preemption/time limit

    # Requeued, the job waits (cred_expire, ~10 s here) before it runs again: status says so meanwhile.
    seen = _wait_for(lambda: [r for r in collect(sweep) if r.status == "pending"], 120, "the requeued job to wait")
    assert seen[0].detail == "requeued" and seen[0].job_id == job_id
    # The same run, uninterrupted; submitted only now, so that its submission (~13 s) delays neither the signal
    # (past the run's end) nor the look at the requeued job (past its wait).
    ref = run_klrl(*common, f"hydra.sweep.dir={ref_sweep}", cwd=tmp_path, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _wait_for(lambda: _summary(run).get("status") in ("completed", "failed", "diverged"), 600, "the requeued run", 1)
    final = json.loads(run_klrl("status", str(sweep), "--json", cwd=tmp_path, check=True).stdout)["runs"][0]
    assert final["status"] == "completed" and final["step"] == 80 and final["job_id"] == job_id
    info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bRestarts=1\b", info), info
    log = (run / "train.log").read_text()
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert resumed and int(resumed[0]) >= 4, log[-2000:]  # from a checkpoint, not from scratch
    assert "resume" not in (run / ".hydra" / "overrides.yaml").read_text()  # the requeued job's overrides: as submitted

    [ref_run] = run_dirs(ref_sweep)
    _wait_for(lambda: _summary(ref_run).get("status") == "completed", 600, "the reference run")
    assert stable(read_metrics(run)) == stable(read_metrics(ref_run))  # the resumed run replays exactly
    print(f"requeue: interrupted at checkpoint step {step}, resumed from step {resumed[0]}")


def test_stock_submitit_launcher_requeues_and_resumes_exactly(slurm_cluster, tmp_path):  # noqa: F811
    # hydra/launcher=submitit_slurm: on SIGUSR2 the trainer checkpoints at the step boundary and hands over to
    # submitit, which calls the stock launcher's checkpoint() (the same overrides again) and requeues the job; the
    # requeued job finds the checkpoint of the same config in the run directory and resume=auto continues it.
    common = ["train", "-m", "estimator=k3", "placement=loss", "seed=3", *FAST, "steps=80", "ckpt_every=5"]
    sweep, ref_sweep = tmp_path / "stock", tmp_path / "stock_reference"
    name = f"klrl-stock-{tmp_path.name}"
    t0 = time.monotonic()
    procs = []
    for where, job_name in ((sweep, name), (ref_sweep, f"{name}-ref")):  # the run, and the same run uninterrupted
        with open(tmp_path / f"{where.name}.out", "w") as out:  # the stock launcher blocks until its jobs end
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "klrl", *common, *stock_launcher(slurm_cluster, job_name),
                 f"hydra.sweep.dir={where}"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT))
    proc, ref = procs

    def output(which: str) -> str:
        return (tmp_path / f"{which}.out").read_text()[-4000:]

    try:
        _wait_for(lambda: run_dirs(sweep) or proc.poll() is not None, 600, "the run to start")
        assert run_dirs(sweep), output("stock")
        [run] = run_dirs(sweep)
        # Periodic checkpoints every 5 steps: a signal between two must make the run checkpoint at the step
        # boundary it reaches, not fall back to the last periodic checkpoint.
        _wait_for(lambda: (_summary(run).get("step") or 0) >= 5 or proc.poll() is not None, 600,
                  "the run's first periodic checkpoint")
        step = _summary(run)["step"]
        assert proc.poll() is None and step < 80, "the run ended before it could be preempted\n" + output("stock")
        [job_id] = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True,
                                  check=True).stdout.split()
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before a preemption
        assert proc.wait(timeout=900) == 0, output("stock")
        print(f"stock launcher, preempted and requeued run: {time.monotonic() - t0:.1f} s")
        assert ref.wait(timeout=600) == 0, output("stock_reference")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    assert not (sweep / "submissions.jsonl").exists()  # klrl's launcher was not involved
    [state] = collect(sweep)  # `klrl status` reads the run directory (no job id: only klrl's launcher records it)
    assert state.status == "completed" and state.job_id is None
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["step"] == 80, summary
    info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bRestarts=1\b", info), info
    log = (run / "train.log").read_text()
    stopped = re.findall(r"SIGUSR2 at step (\d+): checkpointed", log)
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert len(stopped) == 1 and resumed == stopped, log[-3000:]  # continued from the checkpoint the signal made
    assert int(resumed[0]) >= step > 0, log[-3000:]  # not from scratch
    assert "resume" not in (run / ".hydra" / "overrides.yaml").read_text()  # resume=auto, the default, did it

    [ref_run] = run_dirs(ref_sweep)
    assert stable(read_metrics(run)) == stable(read_metrics(ref_run))  # the requeued run replays exactly
    print(f"stock requeue: signalled after checkpoint step {step}, resumed from step {resumed[0]}")
