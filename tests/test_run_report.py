"""A run that reports: `klrl train` ends with a table of how it went, its progress bar shows the step it counts,
evaluation shows its own progress, run directories are named by every choice, and buffered metrics survive an exit
or a kill (at most the records after the last checkpoint are lost, and a resumed run writes them again)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from klrl.runs.rundir import CHECKPOINT, METRICS, SUMMARY, read_json, read_jsonl, read_metrics

from conftest import FAST, run_klrl

QUICK = [a for a in FAST if not a.startswith(("tensorboard=", "progress="))] + ["logger=none"]
# a one-digit task after a longer warm start: accuracy and KL move within a few steps, so values differ by step
LEARNING = ["model.warmstart.steps=100", "model.warmstart.batch_size=32", "task.digits=1", "task.ood_digits=2",
            "task.eval_size=16", "eval.n_samples=2"]


def ci(ev: dict, key: str) -> str:
    return f"{ev[key]:.3f} [{ev[key + '_lo']:.3f}, {ev[key + '_hi']:.3f}]"


def bar_states(stderr: str, desc: str) -> list[tuple[int, dict[str, str]]]:
    """Every state a tqdm bar printed: (count, its postfix as {name: text})."""
    out = []
    for seg in re.split(r"[\r\n]", stderr):
        m = re.match(rf"\s*{desc}:.*?\| (\d+)/\d+ \[[^,\]]*(?:,[^,\]]*)?(?:, (.*))?\]", seg)
        if m:
            out.append((int(m.group(1)), dict(kv.split("=", 1) for kv in (m.group(2) or "").split(", ") if "=" in kv)))
    return out


def test_train_ends_with_the_report_and_its_bar_shows_the_current_step(tmp_path):
    run = tmp_path / "run"
    proc = run_klrl("train", *QUICK, *LEARNING, "steps=4", "progress=true", f"hydra.run.dir={run}", cwd=tmp_path,
                    check=True)
    summary = read_json(run / SUMMARY)
    train = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    assert train[4]["kl/exact"] != train[3]["kl/exact"]  # else a bar one step behind could not be told apart

    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(rf"completed at step 4/4 in 0:00:\d\d: {re.escape(str(run))}", lines[-9])
    labels = ["ID pass@1", "ID greedy", "OOD pass@1", "OOD greedy", "KL (exact)", "entropy"]
    assert [ln.startswith(label) for ln, label in zip(lines[-7:-1], labels)] == [True] * 6, lines
    rows = {label: ln[len(label):] for ln, label in zip(lines[-7:-1], labels)}
    start, end = summary["initial_eval"], summary["final_eval"]
    for label, key in (("ID pass@1", "eval/id/pass@1"), ("OOD greedy", "eval/ood/greedy")):
        assert rows[label].split() == [*ci(start, key).split(), "→", *ci(end, key).split()]
    assert rows["KL (exact)"].split() == [f"{train[1]['kl/exact']:.4g}", "→", f"{train[4]['kl/exact']:.4g}"]
    assert rows["entropy"].split()[-1] == f"{train[4]['entropy']:.4g}"
    assert "95% bootstrap CI" in lines[-1]

    states = [s for s in bar_states(proc.stderr, "train") if s[1]]
    assert states and states[-1][0] == 4
    for step, shown in states:  # every state the bar printed shows the values of the step it counts
        assert shown == {"reward": f"{train[step]['reward']:.3f}", "kl": f"{train[step]['kl/exact']:.4f}"}
    assert bar_states(proc.stderr, "eval")  # evaluation has its own bar


def test_progress_false_prints_no_bar_and_still_the_report(tmp_path):
    proc = run_klrl("train", *QUICK, "steps=1", "progress=false", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path,
                    check=True)
    assert not bar_states(proc.stderr, "train") and not bar_states(proc.stderr, "eval")
    assert "completed at step 1/1" in proc.stdout and "ID pass@1" in proc.stdout


def test_a_run_directory_is_named_by_every_choice(tmp_path):
    choices = ["algo=grpo", "estimator=k3", "placement=loss", "placement.loss_is_weight=true",
               "placement.loss_agg=seq_sum", "beta=0.2"]
    run_klrl("train", *choices, *QUICK, "steps=1", "eval.at_start=false", "progress=false", cwd=tmp_path, check=True)
    (run,) = [p.parent for p in (tmp_path / "outputs" / "runs").glob("*/*/summary.json")]
    assert run.name.split("_", 1)[1].startswith(",".join(choices) + ",")  # <time>_<choices, in command-line order>
    assert "logger=" not in run.name and "progress=" not in run.name  # how it runs, not what it computes


def test_metrics_survive_an_exit_and_a_kill(tmp_path):
    args = [*QUICK, "steps=60", "ckpt_every=3", "eval.at_start=false", "progress=false"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "klrl", "train", *args, f"hydra.run.dir={run}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while not (run / CHECKPOINT).exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.005)
    time.sleep(0.3)  # a few steps past the checkpoint, their records still in the buffer
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert read_json(run / SUMMARY)["status"] == "running"  # killed mid-run
    records, bad = read_jsonl(run / METRICS)
    assert bad == 0  # whole lines only
    steps = [r["step"] for r in records if r["kind"] == "train"]
    import torch

    saved = torch.load(run / CHECKPOINT, weights_only=False)["step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= saved  # nothing lost up to the checkpoint

    run_klrl("train", *args, "resume=true", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == list(range(1, 61))  # every step once: the resumed run wrote the lost ones again
    assert read_json(run / SUMMARY)["status"] == "completed"
