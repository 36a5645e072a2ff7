"""Loggers (`logger=[tensorboard,wandb,mlflow]`), read back from what the real libraries wrote: TensorBoard's event
files, W&B's offline run file (WANDB_MODE=offline; records in W&B's own protobuf schema), MLflow's SQLite store
through MlflowClient. A backend whose package is missing, or W&B online without credentials, is refused in one line
before anything is written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from klrl.paths import install_hint
from klrl.runs.rundir import SUMMARY, read_json, read_metrics, run_name
from klrl.training.trainer import train

from conftest import FAST, compose_cfg, run_klrl

QUICK = [a for a in FAST if not a.startswith(("tensorboard=", "logger="))]  # each test picks its loggers


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B file. The file is a LevelDB-style log (32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type full/first/middle/last) after a 7-byte `:W&B` header; each record is a
    wandb.proto Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    data, pos, chunks, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full, or last of a record in several chunks
            rec = Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def items(entries) -> dict:
    """W&B's key/value entries: a key is `key`, or `nested_key` (a path) as the newer W&B writes it."""
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def wandb_run(run_dir: Path) -> dict:
    """The W&B run as its file tells it: name, group, config, and the history as {step: {key: value}}."""
    run, history = None, {}
    for rec in wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            row = items(rec.history.item)
            history.setdefault(row["_step"], {}).update(row)
    config = items(run.config.update)
    return {"name": run.display_name, "group": run.run_group, "project": run.project, "config": config,
            "history": history}


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def mlflow_history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_one_run_is_read_back_from_all_three(tmp_path):
    task = [*QUICK, "steps=3", "eval.every=2", "beta=0.2"]
    run = tmp_path / "run"
    run_klrl("train", *task, "logger=[tensorboard,wandb,mlflow]", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    records = read_metrics(run)
    train_recs = {r["step"]: r for r in records if r["kind"] == "train"}
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(train_recs) == [1, 2, 3] and sorted(evals) == [0, 2, 3]
    name = run_name([*task, "logger=[tensorboard,wandb,mlflow]"])  # as its directory would be named

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb")).Reload()
    assert {e.step: e.value for e in tb.Scalars("reward")} == pytest.approx({s: r["reward"] for s, r in train_recs.items()})
    assert [e.step for e in tb.Scalars("eval/ood/greedy")] == [0, 2, 3]

    wb = wandb_run(run)
    assert wb["name"] == name and wb["project"] == "klrl" and wb["group"] == ""  # a single run has no group
    assert wb["config"]["beta"] == 0.2 and wb["config"]["estimator"]["name"] == "k1"
    assert sorted(wb["history"]) == [0, 1, 2, 3]
    for step, r in train_recs.items():
        assert wb["history"][step]["reward"] == pytest.approx(r["reward"])
        assert wb["history"][step]["kl/exact"] == pytest.approx(r["kl/exact"])
    for step, r in evals.items():
        assert wb["history"][step]["eval/id/pass@1"] == pytest.approx(r["eval/id/pass@1"])

    client = mlflow_client(f"sqlite:///{run / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("klrl").experiment_id])
    assert found.info.run_name == name and found.info.status == "FINISHED"
    assert found.data.params["beta"] == "0.2" and found.data.params["algo.name"] == "rloo"
    assert found.data.tags["klrl.status"] == "completed"
    assert mlflow_history(client, found.info.run_id, "reward") == pytest.approx(
        {s: r["reward"] for s, r in train_recs.items()})
    assert mlflow_history(client, found.info.run_id, "eval/id/pass_at_1") == pytest.approx(
        {s: r["eval/id/pass@1"] for s, r in evals.items()})
    config = Path(found.info.artifact_uri.removeprefix("file://")) / "config.yaml"
    assert "beta: 0.2" in config.read_text()
    assert read_json(run / SUMMARY)["logger_ids"] == {"wandb": wb_id(run), "mlflow": found.info.run_id}
    # `klrl eval` logs to none of them: it evaluates this run where W&B is not installed
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(package="wandb"), "eval", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def wb_id(run_dir: Path) -> str:
    (path,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    return path.stem.removeprefix("run-")


def test_a_sweep_groups_its_runs(tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "demo"
    run_klrl("train", "-m", *QUICK, "steps=1", "eval.at_start=false", "estimator=k1,k3", "logger=[wandb,mlflow]",
             f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(runs) == 2
    assert {wandb_run(r)["group"] for r in runs} == {"sweeps/demo"}  # the sweep dir, below outputs/
    client = mlflow_client(f"sqlite:///{sweep / 'mlflow.db'}")  # one store for the sweep
    found = client.search_runs([client.get_experiment_by_name("sweeps/demo").experiment_id])
    assert sorted(r.info.run_name for r in found) == sorted(wandb_run(r)["name"] for r in runs)
    assert sorted(r.info.run_name for r in found) == sorted(r.name for r in runs)  # named as their directories
    assert all("estimator=" in r.info.run_name for r in found)
    assert not list(tmp_path.glob("**/tb"))  # tensorboard was not chosen


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    cfg = compose_cfg(*QUICK, "steps=2", "eval.at_start=false", "logger=mlflow")
    assert train(cfg, tmp_path) == "completed"
    cfg = compose_cfg(*QUICK, "steps=4", "eval.at_start=false", "logger=mlflow")  # steps may grow on resume
    assert train(cfg, tmp_path) == "completed"
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("klrl").experiment_id])
    assert sorted(mlflow_history(client, found.info.run_id, "reward")) == [1, 2, 3, 4]
    assert found.info.run_name == tmp_path.name  # outside a Hydra app: the directory's name


BLOCK = """
import sys
sys.modules[{package!r}] = None  # Python's own "not installed" mark: `import` raises ImportError, find_spec says None
from klrl.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("logger,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_missing_package_is_refused_in_one_line(logger, package, tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(package=package), "train", f"logger=[tensorboard,{logger}]"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"klrl: logger={logger} needs the {package} package: "
                                                f"{install_hint(logger)}"]
    assert not list(tmp_path.iterdir())  # nothing built or written


# Everything W&B reads credentials or its host from, besides HOME (~/.netrc, ~/.config/wandb) and the working directory
WANDB_LOGIN_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "WANDB_DIR",
                   "NETRC")


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch) -> Path:
    """W&B in online mode with no credentials anywhere: an empty HOME, none in the environment, an empty working
    directory (no wandb/settings). There is no network to W&B here: nothing may try it."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    for key in WANDB_LOGIN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.chdir(cwd)
    return home


def test_wandb_online_without_credentials_is_refused_before_the_run(no_wandb_login, tmp_path):
    """Not a failed run once the model is built (wandb.init's UsageError): one line, exit 2, nothing written."""
    from klrl.config.schema import NO_WANDB_LOGIN

    proc = run_klrl("train", *QUICK, "steps=1", "logger=[tensorboard,wandb]", cwd=Path.cwd())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"klrl: {NO_WANDB_LOGIN}"]
    assert "wandb login" in NO_WANDB_LOGIN and "WANDB_MODE=offline" in NO_WANDB_LOGIN
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["cwd", "home"]


@pytest.mark.parametrize("way", ["WANDB_API_KEY", "~/.netrc", "WANDB_MODE=offline", "WANDB_MODE=disabled",
                                 "`wandb offline`"])
def test_wandb_needs_credentials_only_online(no_wandb_login, way, monkeypatch):
    """Each way W&B finds a key (the environment; the .netrc entry `wandb login` writes) or runs without one
    (WANDB_MODE; the settings file `wandb offline` writes) passes the check."""
    from klrl.config.schema import wandb_login_missing
    from klrl.config.validate import validate

    assert wandb_login_missing()
    key = "0123456789abcdef" * 2 + "01234567"  # 40 characters, as W&B's keys
    if way == "WANDB_API_KEY":
        monkeypatch.setenv("WANDB_API_KEY", key)
    elif way == "~/.netrc":
        (no_wandb_login / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
        (no_wandb_login / ".netrc").chmod(0o600)
    elif way.startswith("WANDB_MODE="):
        monkeypatch.setenv("WANDB_MODE", way.partition("=")[2])
    else:
        monkeypatch.delenv("WANDB_MODE")  # which a settings file does not override; unset, W&B runs online
        assert wandb_login_missing()
        subprocess.run([sys.executable, "-m", "wandb", "offline"], check=True, capture_output=True, timeout=120,
                       env=dict(os.environ))
        assert "offline" in (Path.cwd() / "wandb" / "settings").read_text()
    assert not wandb_login_missing()
    validate(compose_cfg(*QUICK, "logger=[tensorboard,wandb]"))


def test_logger_none_and_the_deprecated_tensorboard_flag(tmp_path, caplog):
    assert train(compose_cfg(*QUICK, "steps=1", "eval.at_start=false", "logger=none"), tmp_path / "none") == "completed"
    assert not (tmp_path / "none" / "tb").exists() and read_metrics(tmp_path / "none")
    assert train(compose_cfg(*QUICK, "steps=1", "eval.at_start=false", "tensorboard=false"), tmp_path / "old") == "completed"
    assert not (tmp_path / "old" / "tb").exists()
    assert "tensorboard=false is deprecated" in caplog.text
    assert train(compose_cfg(*QUICK, "steps=1", "eval.at_start=false"), tmp_path / "default") == "completed"
    assert any((tmp_path / "default" / "tb").iterdir())  # TensorBoard stays the default
