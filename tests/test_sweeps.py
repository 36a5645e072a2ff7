"""Sweeps without SLURM: grid files expand to the intended union of runs, `klrl status` derives each run's state from
its directory and the scheduler, the launcher requeues with resume=true, and a 2-point grid runs with the local
launcher, then is skipped when submitted again."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from klrl.cli.train import CONF_DIR
from klrl.errors import ConfigError
from klrl.runs.rundir import METRICS, SUMMARY
from klrl.runs.status import collect, derive, expand_job_ids, render
from klrl.cli.sweep import check_jobs, hydra_argv
from klrl.runs.sweep import available, expand, format_value, load_grid

from conftest import FAST, run_klrl

PAPER_MODELS = ("qwen2.5-7b", "llama-3.1-8b-instruct", "qwen3-4b-instruct-2507")


def jobs_of(name: str, *cli: str) -> list[list[str]]:
    grid = load_grid(name)
    _, task_args = hydra_argv(grid, list(cli), wait=True)
    return expand(grid.subgrids, task_args)


def points(jobs: list[list[str]], *drop: str) -> set[frozenset[str]]:
    return {frozenset(o for o in j if o.split("=")[0] not in ("resume", *drop)) for j in jobs}


# ------------------------------------------------------------------------------------------------ grid files
def test_every_grid_file_expands_to_distinct_runs():
    assert {"tiny", "onpolicy", "reward_loss", "async"} <= set(available())
    expected = {"tiny": 10, "onpolicy": 34, "reward_loss": 4, "async": 10}
    for name in available():
        jobs = jobs_of(name)
        assert len({tuple(sorted(j)) for j in jobs}) == len(jobs), name
        # every job resumes when resubmitted: none overrides resume, whose default (auto) continues a run
        assert not any(o.split("=")[0] == "resume" for j in jobs for o in j), name
        if name in expected:
            assert len(jobs) == expected[name], name


def test_tiny_grid_is_the_cartesian_cells_plus_the_no_kl_baseline():
    got = points(jobs_of("tiny"))
    cells = {frozenset({f"estimator={e}", f"placement={p}", f"seed={s}"})
             for e in ("k1", "k3") for p in ("reward", "loss") for s in (0, 1)}
    baseline = {frozenset({"estimator=none", f"seed={s}"}) for s in (0, 1)}
    assert got == cells | baseline


def test_paper_grids_hold_the_papers_configurations():
    onpolicy = points(jobs_of("onpolicy"))
    assert all("experiment=comedy_onpolicy" in p for p in onpolicy)
    onpolicy = {p - {"experiment=comedy_onpolicy"} for p in onpolicy}
    assert frozenset({"estimator=k3", "placement=loss", "model=llama-3.1-8b-instruct", "beta=0.05"}) in onpolicy
    assert {frozenset({"estimator=none", "beta=0", f"model={m}"}) for m in PAPER_MODELS[:2]} <= onpolicy
    assert {p for p in onpolicy if "estimator=none" not in p} == {
        frozenset({f"estimator={e}", f"placement={pl}", f"model={m}", f"beta={b}"})
        for e in ("k1", "k3") for pl in ("reward", "loss") for m in PAPER_MODELS[:2] for b in (0.05, 0.1, 0.3, 1.0)}
    rl = points(jobs_of("reward_loss"), "experiment", "model", "beta", "steps")
    assert rl == {frozenset({"estimator=k1", "placement=both"}), frozenset({"estimator=k3", "placement=both"}),
                  frozenset({"estimator=k1", "placement=reward"}), frozenset({"estimator=k3", "placement=loss"})}
    asy = points(jobs_of("async"))
    assert all("async_level=10" in p for p in asy)
    for exp in ("comedy_async_math", "comedy_async_countdown"):
        mine = {p - {"async_level=10", f"experiment={exp}"} for p in asy if f"experiment={exp}" in p}
        assert mine == {frozenset({f"estimator={e}", f"placement={pl}", "estimator.clamp_value=10"})
                        for e in ("k1", "k3") for pl in ("reward", "loss")} | {frozenset({"estimator=none", "beta=0"})}


def test_paper_experiments_set_the_papers_models_tasks_and_beta():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        math = compose("train", overrides=["experiment=comedy_async_math", "estimator=k1", "placement=reward"])
        cd = compose("train", overrides=["experiment=comedy_async_countdown", "estimator=k3", "placement=loss"])
    assert (math.model.name, math.task.name, math.beta, math.async_level) == ("qwen2.5-7b", "math", 0.005, 10)
    assert (cd.model.name, cd.task.name, cd.beta, cd.async_level) == ("qwen3-4b-instruct-2507", "countdown", 0.005, 10)


def test_grid_points_compose_and_validate():
    check_jobs(jobs_of("tiny"), CONF_DIR)
    for name in ("onpolicy", "reward_loss", "async"):
        grid = load_grid(name)
        hydra_args, task_args = hydra_argv(grid, [], wait=True)
        jobs = expand(grid.subgrids, task_args)
        if not all((Path(CONF_DIR) / "model" / f"{m}.yaml").exists() for m in PAPER_MODELS):
            pytest.skip("the paper's model configs are not in conf/model yet")  # expansion checked above
        subdirs = check_jobs(jobs, CONF_DIR, hydra_args)
        assert len(set(subdirs)) == len(jobs)
        assert all(len(s.encode()) < 255 for s in subdirs), name  # one path component each


def test_union_is_deduplicated_and_the_command_line_wins(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("grid:\n"
                    "  - {estimator: [k1, k3], placement: reward, seed: [0, 1]}\n"
                    "  - {estimator: k1, placement: [reward, loss], seed: 0}\n")
    grid = load_grid(str(path))
    assert len(expand(grid.subgrids, [])) == 5  # k1-reward-0 appears in both sub-grids
    assert len(expand(grid.subgrids, ["seed=7"])) == 3  # seed from the command line replaces the grid's
    assert all("seed=7" in j for j in expand(grid.subgrids, ["seed=7"]))
    assert len(expand(grid.subgrids, ["seed=7,8"])) == 6  # a command-line sweep multiplies every sub-grid
    assert len(expand([{"seed": "range(0,3)", "estimator": "k1"}], [])) == 3  # Hydra sweep syntax in a scalar


@pytest.mark.parametrize("text, message", [
    ("overrides: [seed=1]\ngrid:\n  - {seed: [0, 1]}\n", "both in `overrides` and in the grid"),
    ("grid:\n  - {hydra.launcher.partition: [a, b]}\n", "belong in `overrides`"),
    ("grids: []\n", "unknown key"),
    ("grid: {seed: [0, 1]}\n", "list of non-empty mappings"),
])
def test_bad_grid_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_grid(str(path))


def test_unknown_grid_name_lists_the_choices():
    with pytest.raises(ConfigError, match="choose from: .*tiny"):
        load_grid("no_such_grid")


def test_values_are_quoted_where_hydra_needs_it():
    assert format_value("qwen2.5-7b") == "qwen2.5-7b"
    assert format_value(0.005) == "0.005" and format_value(True) == "true" and format_value(None) == "null"
    assert format_value("a b,c") == "'a b,c'"
    assert expand([{"+note": ["a b,c", "x"]}], []) == [["+note='a b,c'"], ["+note=x"]]


def test_invalid_point_and_shared_run_dir_are_refused_before_launch(tmp_path):
    with pytest.raises(ConfigError, match=r"run \[estimator=none placement=reward\]: placement=reward"):
        check_jobs([["estimator=k1"], ["estimator=none", "placement=reward"]], CONF_DIR)
    # cache_dir does not name run directories (conf/train.yaml exclude_keys): both would write to one directory.
    with pytest.raises(ConfigError, match="would share the run directory"):
        check_jobs([["seed=1", "cache_dir=/tmp/a"], ["seed=1", "cache_dir=/tmp/b"]], CONF_DIR)


def test_common_grid_overrides_do_not_name_run_dirs():
    hydra_args, _ = hydra_argv(load_grid("async"), ["seed=1"], wait=False)
    excl = next(a for a in hydra_args if a.startswith("hydra.job.config.override_dirname.exclude_keys="))
    assert "async_level" in excl and "resume" in excl and "estimator" not in excl
    assert "hydra.launcher.wait=false" in hydra_args
    assert any(a.startswith("hydra.launcher.gpus_per_node=") for a in hydra_args)


def test_sweep_list_and_bad_name_on_the_command_line(tmp_path):
    proc = run_klrl("sweep", "tiny", "--list", "steps=2", "optim.lr=0.001", cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tiny: 10 runs") and len(lines) == 11
    assert "estimator=none,optim.lr=0.001,seed=1" in proc.stdout
    assert "steps=" not in proc.stdout  # resubmitting with more steps extends the same runs
    proc = run_klrl("sweep", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("klrl: sweep 'nope' is not valid; choose from:")
    proc = run_klrl("sweep", "tiny", "beta=0.5", "--list", cwd=tmp_path)
    assert proc.returncode == 2 and "estimator=none" in proc.stderr and "beta=0.5" in proc.stderr
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------------------------------- status
def test_job_id_ranges_as_slurm_prints_them():
    assert expand_job_ids("12_[3-5,7%2]") == ["12_3", "12_4", "12_5", "12_7"]
    assert expand_job_ids("12_[0-6:3]") == ["12_0", "12_3", "12_6"]
    assert expand_job_ids("12_4") == ["12_4"] and expand_job_ids("15") == ["15"]


@pytest.mark.parametrize("summary, sched, status", [
    ({"status": "completed"}, "RUNNING", "completed"),  # accounting lags behind the run's own summary
    ({"status": "diverged"}, None, "diverged"),
    ({"status": "failed", "error": "E"}, "FAILED", "failed"),
    ({"status": "failed", "error": "E"}, "PENDING", "pending"),  # resubmitted
    ({"status": "running"}, "PENDING", "pending"),  # requeued
    ({"status": "running"}, "RUNNING", "running"),
    ({"status": "running"}, "TIMEOUT", "failed"),
    ({"status": "running"}, "CANCELLED", "failed"),
    (None, "PENDING", "pending"),
    (None, "FAILED", "failed"),  # died before the trainer wrote anything
    (None, None, "unknown"),
])
def test_status_rules(summary, sched, status):
    from klrl.runs.rundir import State

    state = State(summary["status"], detail=summary.get("error", "")) if summary else State("pending")
    assert derive(state, sched, {"job_id": "1_0"})[0] == status


@pytest.mark.parametrize("state, detail", [("unknown", ""), ("pending", ""), ("running", "requeued"),
                                           ("failed", "requeued")])
def test_only_a_run_that_started_is_called_requeued(state, detail):
    """A task of an array still waiting behind array_parallelism has no run directory yet: it is pending, and
    nothing has been requeued."""
    from klrl.runs.rundir import State

    assert derive(State(state), "PENDING", {"job_id": "1_3"}) == ("pending", detail)


def _fake_run(sweep: Path, name: str, overrides: list[str], summary: dict | None, steps_done: int) -> None:
    """A run directory as the trainer leaves it; a "running" one has a live heartbeat."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"steps": 10}))
    if summary is not None:
        (run / SUMMARY).write_text(json.dumps(summary))
        if summary["status"] == "running":
            (run / "heartbeat").touch()
    recs = [{"step": 0, "kind": "eval"}] + [{"step": s, "kind": "train", "reward": 0.5} for s in range(1, steps_done + 1)]
    (run / METRICS).write_text("".join(json.dumps(r) + "\n" for r in recs))


def _fake_slurm(bin_dir: Path, squeue: str, sacct: str) -> dict:
    bin_dir.mkdir()
    for name, out in (("squeue", squeue), ("sacct", sacct)):
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir}/{name}.args\ncat <<'EOF'\n{out}EOF\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_status_of_a_synthetic_sweep_joins_run_dirs_and_slurm(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    runs = {
        "s=0": ({"status": "completed", "step": 10, "steps": 10}, 10, "7_0"),
        "s=1": ({"status": "running", "step": 4, "steps": 10}, 6, "7_1"),      # live step from metrics.jsonl
        "s=2": ({"status": "failed", "step": 2, "steps": 10, "error": "ValueError: boom"}, 3, "7_2"),
        "s=3": ({"status": "running", "step": 4, "steps": 10}, 5, "7_3"),      # requeued, waits
        "s=4": ({"status": "running", "step": 0, "steps": 10}, 0, "7_4"),      # killed at its time limit
        "s=5": (None, 0, "7_5"),                                                # not started yet
        "s=6": ({"status": "diverged", "step": 3, "steps": 10}, 3, "7_6"),
    }
    for name, (summary, done, _) in runs.items():
        if name != "s=5":
            _fake_run(sweep, name, [name, "resume=true", "steps=10"], summary, done)
    (sweep / ".submitit").mkdir()
    sub = {"executor": "slurm", "host": "h", "folder": str(sweep / ".submitit" / "%j"),
           "runs": [{"run": n, "overrides": [n, "resume=true", "steps=10"], "steps": 10, "num": i, "job_id": j}
                    for i, (n, (_, _, j)) in enumerate(runs.items())], "skipped": []}
    (sweep / "submissions.jsonl").write_text(json.dumps(sub) + "\n")
    squeue = "7_1|RUNNING\n7_3|PENDING\n7_4|TIMEOUT\n7_[5]|PENDING\n"
    sacct = "7_0|COMPLETED\n7_1|RUNNING\n7_2|FAILED\n7_3|REQUEUED\n7_4|TIMEOUT\n7_5|PENDING\n7_6|COMPLETED\n"
    env = _fake_slurm(tmp_path / "bin", squeue, sacct)
    monkeypatch.setenv("PATH", env["PATH"])

    got = {s.run: (s.status, s.step, s.job_id) for s in collect(sweep)}
    assert got == {"s=0": ("completed", 10, "7_0"), "s=1": ("running", 6, "7_1"), "s=2": ("failed", 3, "7_2"),
                   "s=3": ("pending", 5, "7_3"), "s=4": ("failed", 0, "7_4"), "s=5": ("pending", None, "7_5"),
                   "s=6": ("diverged", 3, "7_6")}
    assert "-j 7" in (tmp_path / "bin" / "sacct.args").read_text()  # asked about our array only

    proc = run_klrl("status", str(sweep), cwd=tmp_path, check=True)
    out = proc.stdout
    assert "every run: steps=10" in out and "7 runs: 1 pending" not in out
    assert "7 runs: 2 pending, 1 running, 1 completed, 1 diverged, 2 failed" in out
    row = next(line for line in out.splitlines() if line.startswith("s=2 "))
    assert "failed" in row and "3/10" in row and "ValueError: boom" in row
    row = next(line for line in out.splitlines() if line.startswith("s=4 "))
    assert "job ended (TIMEOUT)" in row
    data = json.loads(run_klrl("status", str(sweep), "--json", cwd=tmp_path, check=True).stdout)
    assert [r["status"] for r in data["runs"]][:3] == ["completed", "running", "failed"]


def test_status_without_a_scheduler_reads_run_dirs_only(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "a", ["a"], {"status": "completed", "step": 2, "steps": 2}, 2)
    _fake_run(sweep, "b", ["b"], {"status": "running", "step": 1, "steps": 2}, 1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # neither squeue nor sacct
    got = {s.run: s.status for s in collect(sweep)}
    assert got == {"a": "completed", "b": "running"}
    assert "2 runs: 1 running, 1 completed" in render(collect(sweep))


# ------------------------------------------------------------------------------------------------- launcher
def test_requeue_resubmits_the_same_overrides():
    """As the stock launcher does: the requeued job re-runs the run's own overrides, and resume=auto continues it."""
    from hydra_plugins.klrl_sweeps.launcher import KlrlSlurmLauncher

    launcher = KlrlSlurmLauncher(submitit_folder="/tmp/x/%j", timeout_min=1)
    delayed = launcher.checkpoint(["seed=1"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert delayed.function is launcher
    assert delayed.args[0] == ["seed=1"] and delayed.args[1:] == ("hydra.sweep.dir", 3, "job_id_for_3", {})


def test_launcher_configs_compose_and_keep_launcher_keys_out_of_the_primary_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
        local = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
        cfg = compose("train")
    assert slurm._target_.endswith("KlrlSlurmLauncher") and slurm.partition == "gpu" and slurm.wait
    assert slurm.additional_parameters.requeue is True and slurm.max_num_timeout > 0
    assert "/.submitit/" in slurm.submitit_folder
    assert local._target_.endswith("KlrlLocalLauncher") and "partition" not in local
    assert not any(k in cfg for k in ("partition", "submitit_folder", "launcher"))


def test_local_launcher_runs_a_two_point_grid_then_skips_it(tmp_path):
    grid = tmp_path / "two.yaml"
    grid.write_text("overrides: [optim.lr=0.001]\ngrid:\n  - {estimator: [k1, k3], placement: loss}\n")
    sweep = tmp_path / "sweep"
    args = ["sweep", str(grid), "hydra/launcher=local", f"hydra.sweep.dir={sweep}", *FAST, "steps=2"]
    proc = run_klrl(*args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 2 runs to local" in proc.stdout and "2 runs: 2 completed" in proc.stdout
    runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(runs) == 2 and all("optim.lr" not in r.name for r in runs)  # common keys do not name runs
    for r in runs:
        assert json.loads((r / SUMMARY).read_text())["status"] == "completed"
        assert "resume=" not in (r / ".hydra" / "overrides.yaml").read_text().lower()  # the default, auto, resumes
    before = {r: (r / METRICS).read_bytes() for r in runs}
    subs = (sweep / "submissions.jsonl").read_text().splitlines()
    assert len(subs) == 1 and len(json.loads(subs[0])["runs"]) == 2

    again = run_klrl(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 runs already finished" in again.stdout and "nothing to submit" in again.stdout
    assert {r: (r / METRICS).read_bytes() for r in runs} == before
    assert len((sweep / "submissions.jsonl").read_text().splitlines()) == 1

    status = run_klrl("status", str(sweep), cwd=tmp_path, check=True).stdout
    assert "2 runs: 2 completed" in status

    # The same run names with another configuration (an edited grid file) are refused, not counted as done.
    grid.write_text("overrides: [optim.lr=0.002]\ngrid:\n  - {estimator: [k1, k3], placement: loss}\n")
    drift = run_klrl(*args, cwd=tmp_path, timeout=600)
    assert drift.returncode == 2 and "finished with another configuration" in drift.stderr
    assert "optim.lr: 0.001 -> 0.002" in drift.stderr
    assert len((sweep / "submissions.jsonl").read_text().splitlines()) == 1


def test_a_reader_that_leaves_early_is_no_traceback():
    """`klrl sweep tiny --list | head -1`: the pipe closes under the listing; klrl exits 1 without a traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from klrl.cli.main import main; "
                             "main(['sweep', 'tiny', '--list'])"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
