"""`klrl eval RUN_DIR` on a real (tiny) run: it rebuilds the model through the trainer's loading path, and with the
run's own settings reproduces the run's final evaluation exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

KLRL = str(Path(sys.executable).parent / "klrl")


def klrl(*args, timeout=600):
    return subprocess.run([KLRL, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two RL steps on one-digit addition after a short warm start: accuracy above zero, so comparisons mean something."""
    root = tmp_path_factory.mktemp("evalrun")
    run = root / "run"
    proc = klrl("train", "steps=2", f"hydra.run.dir={run}", f"cache_dir={root / 'cache'}", "model.warmstart.steps=100",
                "model.warmstart.batch_size=32", "task.digits=1", "task.ood_digits=2", "task.eval_size=16",
                "algo.prompts_per_step=4", "algo.group_size=2", "eval.n_samples=2", "progress=false", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def results(run_dir: Path) -> list[dict]:
    """Every `klrl eval` result so far: one line each, appended (an earlier result is never lost)."""
    return [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]


def test_eval_reproduces_the_final_evaluation(run_dir):
    proc = klrl("eval", run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())["final_eval"]
    result = results(run_dir)[-1]
    assert result["step"] == 2 and result["n_samples"] == 2 and result["splits"] == ["id", "ood"]
    assert result["metrics"] == final
    assert final["eval/id/greedy"] > 0
    assert f"eval/id/pass@1               {final['eval/id/pass@1']:.4f}" in proc.stdout
    assert result["eval_sampling"] == {"temperature": 1.0, "top_p": 1.0}


def test_eval_options(run_dir):
    before = results(run_dir) if (run_dir / "evals.jsonl").exists() else []
    proc = klrl("eval", run_dir, "--n-samples", 3, "--split", "ood")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(run_dir)[: len(before)] == before  # earlier results kept
    result = results(run_dir)[-1]
    assert result["n_samples"] == 3 and result["splits"] == ["ood"]
    assert set(result["metrics"]) == {f"eval/ood/{m}{s}" for m in ("pass@1", "greedy") for s in ("", "_lo", "_hi")}


@pytest.mark.parametrize("args, message", [
    (["--split", "test"], "klrl: --split 'test' is not valid; choose from: id, ood"),
    (["--n-samples", "0"], "klrl: eval.n_samples=0 is not valid; it must be an integer in 1..65536"),
    (["--temperature", "-1"], "klrl: eval.temperature=-1.0 is not valid; it must be a finite number > 0"),
])
def test_eval_bad_options(run_dir, args, message):
    proc = klrl("eval", run_dir, *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message]


def test_eval_needs_a_run_with_a_checkpoint(tmp_path, run_dir):
    proc = klrl("eval", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"klrl: {tmp_path} is not a run directory: {tmp_path}/.hydra/config.yaml is missing"

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    proc = klrl("eval", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"klrl: {tmp_path} holds no checkpoint.pt to evaluate"
