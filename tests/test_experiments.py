"""The paper's experiment overlays compose to the paper's settings, and fail cleanly when their data is offline."""

from __future__ import annotations

import pytest

from conftest import compose_cfg, run_klrl


@pytest.mark.parametrize(
    "name,model,task,steps,beta,lag",
    [
        ("comedy_onpolicy", "qwen2.5-7b", "math", 250, 0.05, 0),
        ("comedy_async_math", "qwen2.5-7b", "math", 420, 0.005, 10),
        ("comedy_async_countdown", "qwen3-4b-instruct-2507", "countdown", 520, 0.005, 10),
    ],
)
def test_experiment_overlays(name, model, task, steps, beta, lag):
    cfg = compose_cfg(f"experiment={name}", "estimator=k3", "placement=loss")
    assert (cfg.model.name, cfg.task.name, cfg.steps, cfg.beta, cfg.async_level) == (model, task, steps, beta, lag)
    assert cfg.estimator.name == "k3" and cfg.placement.name == "loss"  # the command line still picks the cell
    if lag:
        assert cfg.algo.baseline == "dr_grpo" and cfg.algo.is_truncate == 8 and cfg.algo.group_size == 16


def test_offline_paper_run_fails_before_building_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_klrl("train", "experiment=comedy_async_math", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "EleutherAI/hendrycks_math" in proc.stderr and "download" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_no_kl_baseline_inside_an_experiment():
    cfg = compose_cfg("experiment=comedy_onpolicy", "estimator=none")
    assert cfg.beta == 0 and cfg.placement.name == "none" and cfg.model.name == "qwen2.5-7b"
