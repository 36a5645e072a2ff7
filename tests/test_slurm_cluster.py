"""The private SLURM cluster really schedules, runs, accounts for and requeues jobs."""

import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError

from klrl.testing.slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slow

# Jobs unpickle what they run in a fresh interpreter that cannot import this test
# module (pytest put tests/ on sys.path, not PYTHONPATH), so ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def explode():
    raise ValueError("boom")


class PreemptedOnce(submitit.helpers.Checkpointable):
    """Sends itself SIGUSR2 on its first run, as Slurm does before a preemption or timeout."""

    def __init__(self):
        self.runs = 0

    def __call__(self, x):
        self.runs += 1  # part of the checkpoint, which pickles self
        if self.runs == 1:
            os.kill(os.getpid(), signal.SIGUSR2)  # submitit checkpoints and requeues
            time.sleep(120)
        return x, self.runs


def _executor(cluster, folder):
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=10, slurm_partition=cluster.partition, cpus_per_task=1)
    return ex


def test_node_is_idle(slurm_cluster):  # noqa: F811
    out = subprocess.run(["sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%T"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["idle"]


def test_single_job_returns_value(slurm_cluster, tmp_path):  # noqa: F811
    job = _executor(slurm_cluster, tmp_path).submit(square, 7)
    assert job.result() == 49
    # submitit reads the state from sacct, which hears of the end asynchronously.
    deadline = time.monotonic() + 30
    while job.get_info(mode="force").get("State") != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.state == "COMPLETED"


def test_job_array_and_accounting(slurm_cluster, tmp_path):  # noqa: F811
    jobs = _executor(slurm_cluster, tmp_path).map_array(square, [1, 2, 3, 4])
    assert len(jobs) == 4
    assert [j.result() for j in jobs] == [1, 4, 9, 16]
    array_id = jobs[0].job_id.split("_")[0]
    assert all(j.job_id.startswith(f"{array_id}_") for j in jobs)
    # slurmctld reports job ends to slurmdbd asynchronously; give it a moment.
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State"],
                             capture_output=True, text=True, check=True).stdout
        rows = dict(line.split("|") for line in out.split())
        if sorted(rows.values()) == ["COMPLETED"] * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows == {f"{array_id}_{i}": "COMPLETED" for i in range(4)}


def test_raising_job_fails(slurm_cluster, tmp_path):  # noqa: F811
    job = _executor(slurm_cluster, tmp_path).submit(explode)
    with pytest.raises(FailedJobError, match="boom"):
        job.result()


def test_checkpoint_and_requeue(slurm_cluster, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    job = _executor(slurm_cluster, tmp_path).submit(PreemptedOnce(), "x")
    assert job.result() == ("x", 2)
    # The requeue delay is cred_expire + 1 s plus up to sched_interval (see slurm_cluster.py);
    # with Slurm's defaults this took ~2 min.
    assert time.monotonic() - t0 < 60
    # slurmctld keeps finished jobs for MinJobAge (300 s), so the record is still there.
    info = subprocess.run(["scontrol", "-o", "show", "job", job.job_id],
                          capture_output=True, text=True, check=True).stdout
    assert "Restarts=1" in info
