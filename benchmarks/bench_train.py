"""Benchmark the embedded default: `klrl train` wall time (with and without the cached warm start), accuracy
gained, and generation / training throughput. Prints a markdown table; writes benchmarks/results/train.json.

    python benchmarks/bench_train.py [extra klrl train overrides...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from klrl.runs.rundir import read_json, read_metrics
from report import machine, print_metrics, save  # benchmarks/report.py


def run(args: list[str], cache: str, run_dir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "klrl", "train", "progress=false", f"hydra.run.dir={run_dir}", *args],
                   check=True, env={**os.environ, "KLRL_CACHE": cache}, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        cold = run(extra, tmp, Path(tmp) / "cold")
        warm = run(extra, tmp, Path(tmp) / "warm")
        summary = read_json(Path(tmp) / "warm" / "summary.json")
        steps = [r for r in read_metrics(Path(tmp) / "warm") if r["kind"] == "train"][1:]
    med = lambda k: statistics.median(r[k] for r in steps)  # noqa: E731
    res = {
        "machine": machine(),
        "overrides": extra,
        "wall_s_cold_cache": round(cold, 1),
        "wall_s_warm_cache": round(warm, 1),
        "steps": summary["steps"],
        "id_pass@1_start": summary["initial_eval"]["eval/id/pass@1"],
        "id_pass@1_end": summary["final_eval"]["eval/id/pass@1"],
        "ood_pass@1_start": summary["initial_eval"]["eval/ood/pass@1"],
        "ood_pass@1_end": summary["final_eval"]["eval/ood/pass@1"],
        "step_s_median": round(med("time/step"), 4),
        "generate_tokens_per_s_median": round(med("tokens_per_s/generate")),
        "train_tokens_per_s_median": round(med("tokens_per_s/train")),
        "versions": summary["versions"],
    }
    save(res, "train")
    print_metrics(res)


if __name__ == "__main__":
    main()
