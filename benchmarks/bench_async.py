"""Benchmark the real asynchronous pipeline (async_mode=pipeline, async_level 1 and 2) against the synchronous
trainer on the embedded default: training-loop steps/s. Prints a markdown table; writes benchmarks/results/async.json.

    python benchmarks/bench_async.py [--steps N] [--repeats R] [extra klrl train overrides...]

Each run trains in this process with the default config (warm start cached first, no evaluation). Steps/s is
measured over the loop after the first `SKIP` steps, so that process start-up, model loading and the pipeline's
initial fill are left out; they are reported separately as setup_s. Runs are interleaved and repeated, and the
median is reported, because the machine may be shared.

Threads: 1 per process, in the trainer and in the generator, so that on 2 cores generation and training overlap
instead of contending for the same cores. `--threads 2` gives the synchronous trainer both cores for comparison
(with other work on the machine it can be several times slower than 1 thread: OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import klrl.training.trainer
from klrl.cli.train import CONF_DIR
from klrl.models.registry import load_model
from klrl.runs.rundir import read_metrics
from klrl.tasks import TASKS
from report import COUNT, THREADS, machine, save  # benchmarks/report.py

SKIP = 3
COMMON = ["progress=false", "logger=none", "eval.at_start=false", "ckpt_every=100000", "algo.is_truncate=8"]
MODES = {  # name: (overrides, torch threads per process)
    "sync, 1 thread": (["async_level=0"], 1),
    "pipeline k=1, 1+1 threads": (["async_mode=pipeline", "async_level=1"], 1),
    "pipeline k=2, 1+1 threads": (["async_mode=pipeline", "async_level=2"], 1),
}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run(overrides: list[str], threads: int, run_dir: Path) -> dict:
    ends: list[float] = []
    seen_threads = []
    real_update = klrl.training.trainer.update

    def timed_update(*a, **kw):
        rec = real_update(*a, **kw)
        ends.append(time.perf_counter())
        seen_threads.append(torch.get_num_threads())
        return rec

    cfg = compose_cfg(overrides)
    if "cpu_threads" in cfg.model:  # the trainer sets its threads from the config (and the pipeline its generator's)
        cfg = compose_cfg([*overrides, f"model.cpu_threads={threads}"])
    saved = torch.get_num_threads(), klrl.trainer.evaluate
    try:
        if "cpu_threads" not in cfg.model:  # the pipeline splits the trainer's threads in half
            torch.set_num_threads(threads * (2 if cfg.async_mode == "pipeline" else 1))
        klrl.training.trainer.update, klrl.trainer.evaluate = timed_update, lambda *a, **kw: {}  # evaluation is no train step
        t0 = time.perf_counter()
        klrl.trainer.train(cfg, run_dir)
    finally:
        klrl.training.trainer.update, klrl.trainer.evaluate = real_update, saved[1]
        torch.set_num_threads(saved[0])
    recs = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    return {
        "trainer_threads": statistics.mode(seen_threads),
        "steps_per_s": (len(ends) - SKIP) / (ends[-1] - ends[SKIP - 1]),
        "setup_s": ends[SKIP - 1] - t0,
        "staleness_mean": statistics.mean(r["staleness"] for r in recs[SKIP:]),
        "wait_s_median": statistics.median(r.get("time/wait", 0.0) for r in recs[SKIP:]),
        "generate_s_median": statistics.median(r["time/generate"] for r in recs[SKIP:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=COUNT, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=THREADS, default=1, help="torch threads of the synchronous trainer")
    args, extra = ap.parse_known_args()
    if args.threads != 1:
        MODES[f"sync, {args.threads} threads"] = (["async_level=0"], args.threads)
    common = [*COMMON, f"steps={args.steps}", *extra]
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("KLRL_CACHE", str(Path(tmp) / "cache"))
        cfg = compose_cfg(common)  # build and cache the warm start before timing anything
        load_model(cfg.model, TASKS[cfg.task.name](cfg.task, cfg.seed), cfg.task, cfg.cache_dir)
        for r in range(args.repeats):
            for mode, (overrides, threads) in MODES.items():
                results[mode].append(run([*common, *overrides], threads, Path(tmp) / f"{mode}-{r}".replace(" ", "_")))
    med = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in results.items()}
    base = med["sync, 1 thread"]["steps_per_s"]
    rows = [{"mode": m, **{k: round(v, 3) for k, v in s.items()}, "speedup": round(s["steps_per_s"] / base, 2)}
            for m, s in med.items()]
    res = {
        "machine": machine(),
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "steps": args.steps, "skipped_steps": SKIP, "repeats": args.repeats, "overrides": common,
        "rows": rows, "runs": results,
    }
    save(res, "async")
    print(f"{res['machine']}; {args.steps} steps, median of {args.repeats}; "
          f"load average {res['load_average_1m_before_after']} (before, after)\n")
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
