"""What one SmolLM2-135M-Instruct Countdown step costs on this machine, and where the model starts: the numbers that
decide whether a smollm2 grid fits. Prints a markdown table; writes benchmarks/results/smollm2.json.

    python benchmarks/bench_smollm2.py [extra klrl train overrides...]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from klrl.runs.rundir import read_json, read_metrics
from report import machine, print_metrics, save  # benchmarks/report.py

DEFAULTS = ["model=smollm2-135m", "task=countdown", "steps=4", "algo.prompts_per_step=4", "algo.group_size=4",
            "task.max_new_tokens=256", "task.partial_credit=true", "task.eval_size=16", "eval.n_samples=1",
            "eval.greedy=false", "estimator=k3", "placement=loss", "beta=0.1", "optim.lr=1e-6", "logger=none"]


def main() -> None:
    args = DEFAULTS + sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "klrl", "train", "progress=false", f"hydra.run.dir={run_dir}", *args],
                       check=True, capture_output=True)
        wall = time.perf_counter() - t0
        summary = read_json(run_dir / "summary.json")
        steps = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    med = lambda k: statistics.median(r[k] for r in steps)  # noqa: E731
    res = {
        "machine": machine(),
        "overrides": args,
        "wall_s": round(wall, 1),
        "step_s_median": round(med("time/step"), 2),
        "generate_s_median": round(med("time/generate"), 2),
        "response_tokens_median": round(med("response_length"), 1),
        "generate_tokens_per_s_median": round(med("tokens_per_s/generate")),
        "train_tokens_per_s_median": round(med("tokens_per_s/train")),
        "train_reward_mean": round(statistics.mean(r["reward"] for r in steps), 3),
        "id_pass@1_start": summary["initial_eval"]["eval/id/pass@1"],
        "ood_pass@1_start": summary["initial_eval"]["eval/ood/pass@1"],
    }
    save(res, "smollm2")
    print_metrics(res)


if __name__ == "__main__":
    main()
