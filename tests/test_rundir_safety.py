"""Run directories cannot be damaged: a refused command, a corrupt checkpoint, a second process and a full disk
each leave an existing run as it was; a killed run shows as stale; concurrent jobs build a warm start once."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klrl.runs.checkpoint import PREVIOUS
from klrl.runs.rundir import CHECKPOINT, RunDir, config_diff, read_json, read_metrics

from conftest import FAST, run_klrl


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the lock file aside: it is the lock, not the run's data)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}


def train(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run_klrl("train", *FAST, *args, cwd=cwd, **kw)


@pytest.fixture
def finished(tmp_path) -> Path:
    """A completed 4-step run with checkpoints at steps 2 and 4 (so checkpoint.prev.pt exists)."""
    run = tmp_path / "run"
    train("steps=4", "ckpt_every=2", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    assert (run / CHECKPOINT).exists() and (run / PREVIOUS).exists()
    return run


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klrl: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_refused_resume_leaves_the_run_byte_identical(finished, tmp_path):
    before = tree(finished)
    for bad in (["steps=6", "beta=0.2"], ["steps=6", "model.hidden_size=32"], ["steps=4", "resume=false"]):
        proc = train(*bad, f"hydra.run.dir={finished}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        one_line(proc)
        assert tree(finished) == before, bad


def test_a_run_is_not_placed_inside_a_run_or_above_other_runs(finished, tmp_path):
    """A run inside another run's directory, or in a directory that already holds runs, would be read together with
    them by `klrl table` and `klrl status` (and hide them): refused in one line, and nothing is written."""
    sweep = tmp_path / "sweep"
    (sweep / "a").mkdir(parents=True)  # a sweep that holds one finished run
    (sweep / "a" / "summary.json").write_text((finished / "summary.json").read_text())
    before, before_sweep = tree(finished), tree(sweep)
    cases = [(finished / "nested", "hydra.run.dir", "is inside the run"),
             (sweep, "hydra.run.dir", "already holds other runs"),
             (finished / "sweep", "hydra.sweep.dir", "is inside the run"),
             (finished, "hydra.sweep.dir", "is a run directory"),
             (sweep, "hydra.sweep.dir", "already holds other runs")]  # no multirun.yaml: not an earlier sweep's runs
    for where, key, why in cases:
        bad = train(*(["-m", "seed=0,1"] if key == "hydra.sweep.dir" else []), "steps=4", f"{key}={where}",
                    cwd=tmp_path)
        err = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(err) == 1 and key in err[0], (where, bad.stderr[-2000:])
        assert why in err[0] and str(where) in err[0], err
    assert tree(finished) == before and tree(sweep) == before_sweep and not (finished / "nested").exists()
    assert not (finished / "sweep").exists()


def test_fewer_steps_than_a_run_reached_is_refused(finished, tmp_path):
    """steps may grow when a run is continued; fewer steps than it reached would rewrite a finished run as a shorter
    one (its final evaluation gone): refused, and the run stays byte-identical."""
    before = tree(finished)
    err = one_line(train("steps=2", f"hydra.run.dir={finished}", cwd=tmp_path))
    assert "holds a run at step 4; steps=2" in err and "steps >= 4" in err
    assert tree(finished) == before


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(finished, tmp_path):
    ckpt = finished / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    proc = train("steps=6", "ckpt_every=2", f"hydra.run.dir={finished}", cwd=tmp_path, check=True)
    assert "checkpoint.pt: truncated or corrupt" in proc.stderr and "resumed from step 2" in proc.stderr
    summary = read_json(finished / "summary.json")
    assert summary["status"] == "completed" and summary["step"] == 6
    steps = [r["step"] for r in read_metrics(finished) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 done again from the step-2 checkpoint


def test_no_readable_checkpoint_is_one_line_and_touches_nothing(finished, tmp_path):
    for name in (CHECKPOINT, PREVIOUS):
        (finished / name).write_bytes(b"not a checkpoint")
    before = tree(finished)
    proc = train("steps=6", f"hydra.run.dir={finished}", cwd=tmp_path)
    assert proc.returncode == 2 and "holds no readable checkpoint" in one_line(proc)
    assert tree(finished) == before  # the completed run's summary is not rewritten as failed
    assert read_json(finished / "summary.json")["status"] == "completed"


def test_a_second_process_is_refused(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "klrl", "train", *FAST, "steps=400", f"hydra.run.dir={run}"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while not [r for r in read_metrics(run) if r["kind"] == "train"]:
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        config = (run / ".hydra" / "config.yaml").read_bytes()
        proc = train("steps=400", f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 2 and "another process is training" in one_line(proc)
        assert (run / ".hydra" / "config.yaml").read_bytes() == config
        assert first.poll() is None and read_json(run / "summary.json")["status"] == "running"
    finally:
        first.kill()
        first.wait()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_and_keeps_the_last_good_state(finished, tmp_path):
    good = (finished / CHECKPOINT).read_bytes()
    limit = len(good) // 2  # a checkpoint no longer fits; the small files do
    proc = subprocess.run([sys.executable, "-m", "klrl", "train", *FAST, "steps=6", "ckpt_every=2",
                           f"hydra.run.dir={finished}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ), preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "file too large" in line and "the last good checkpoint is intact" in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (finished / CHECKPOINT).read_bytes() == good
    assert not [p for p in finished.iterdir() if p.name.startswith(".checkpoint")]  # no half-written file left
    # With room again, the run resumes from that checkpoint and finishes.
    train("steps=6", "ckpt_every=2", f"hydra.run.dir={finished}", cwd=tmp_path, check=True)
    assert read_json(finished / "summary.json")["status"] == "completed"


def test_a_killed_run_is_stale(tmp_path):
    run = tmp_path / "sweep" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "klrl", "train", *FAST, "steps=400", f"hydra.run.dir={run}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while not [r for r in read_metrics(run) if r["kind"] == "train"]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    env = {**os.environ, "KLRL_STALE_S": "3"}
    live = subprocess.run([sys.executable, "-m", "klrl", "status", str(tmp_path / "sweep")], capture_output=True,
                          text=True, env={**os.environ}, timeout=120)
    assert "1 runs: 1 running" in live.stdout, live.stdout
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(4)
    dead = subprocess.run([sys.executable, "-m", "klrl", "status", str(tmp_path / "sweep")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert "1 runs: 1 stale" in dead.stdout and "no heartbeat for" in dead.stdout, dead.stdout
    assert RunDir(run).state().status in ("running", "stale")  # the default threshold is two minutes


def test_the_warm_start_key_leaves_out_evaluation_settings():
    from klrl.models.cache import config_hash
    from klrl.tasks import TASKS

    from conftest import compose_cfg

    def signature(*overrides):
        cfg = compose_cfg(*overrides)
        return config_hash(TASKS[cfg.task.name](cfg.task, 0).warmstart_signature())

    assert signature() == signature("task.eval_size=20", "task.max_new_tokens=9", "eval.n_samples=1",
                                    "model.fsdp=true", "model.param_dtype=float32", "seed=3")
    assert signature() != signature("task.digits=3")


@pytest.mark.slow
def test_concurrent_jobs_build_the_warm_start_once(tmp_path):
    cache = tmp_path / "cold-cache"
    sweep = tmp_path / "sweep"
    proc = run_klrl("train", "-m", *FAST, "steps=1", "seed=0,1,2,3", "hydra/launcher=local", f"cache_dir={cache}",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in sweep.rglob("train.log"))
    assert logs.count("warm-starting the tiny model") == 1, logs[-3000:]
    assert len([p for p in (cache / "warmstart").iterdir() if not p.name.startswith(".")]) == 1


def test_one_list_of_operational_keys():
    """The keys that may change on resume are the keys that never name a run directory (conf/train.yaml)."""
    from omegaconf import OmegaConf

    from klrl.paths import CONF_DIR
    from klrl.runs.rundir import RESUMABLE

    train_yaml = OmegaConf.load(Path(CONF_DIR) / "train.yaml")
    assert sorted(train_yaml.hydra.job.config.override_dirname.exclude_keys) == sorted(RESUMABLE)


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_get_the_mode_open_gives(tmp_path, umask, expected):
    """A file atomic_write leaves has the mode a plain open() would give it (0666 less the umask), not the 0600 of
    tempfile.mkstemp; replacing a file does too, and no temporary file is left behind."""
    from klrl.runs.rundir import atomic_write, write_json

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write("text"))
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"\0"), mode="wb")
        write_json(tmp_path / "a.txt", {"replaced": True})
        (tmp_path / "plain.txt").write_text("open()")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.txt": expected, "b.bin": expected, "plain.txt": expected}
    assert read_json(tmp_path / "a.txt") == {"replaced": True}


def test_a_changed_group_option_is_named_once_in_the_config_difference():
    """Refusing a resume names what the user changed: placement=reward -> loss is one entry, not every key that
    follows from the option; a changed key inside the same option is named by its path."""
    from klrl.cli.compose import compose
    from klrl.runs.rundir import comparable

    base = comparable(compose(["placement=reward"], check=False))
    assert config_diff(base, comparable(compose(["placement=loss"], check=False))) == [
        "placement: 'reward' -> 'loss'"]
    assert config_diff(base, comparable(compose(["placement=reward", "placement.reward_form=togo"], check=False))) \
        == ["placement.reward_form: 'seqsum' -> 'togo'"]
    assert config_diff(base, comparable(compose(["placement=reward", "preset=trl_grpo", "placement=loss"],
                                                check=False)))[-1] == "preset: None -> 'trl_grpo'"
    assert config_diff(base, base) == []
