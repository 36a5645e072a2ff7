"""How close klrl's SmolLM2-135M update step gets to this machine's float32 matmul peak.

1. Peak: torch.matmul on large square float32 matrices (2 n^3 FLOPs each), best of several runs, at 1 and 2 threads.
2. klrl: the vs_trl.py smollm2 workload (4 prompts x 4 samples, 64 prompt + 64 new tokens, grpo_k3_loss), through
   the same KlrlStepper (the trainer's own parts). FLOPs counted once with torch's FlopCounterMode (matmuls and
   attention, forward and backward), time measured separately (the counter slows what it counts); also the 6 N T
   rule of thumb.
Writes benchmarks/results/flops.json.

    python benchmarks/flops.py [--threads 2] [--updates 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from report import THREADS, machine, print_metrics, save  # benchmarks/report.py
from vs_trl import WORKLOADS, KlrlStepper


def matmul_peak(threads: int, sizes=(1024, 2048, 4096), seconds: float = 2.0) -> dict:
    """GFLOP/s of float32 torch.matmul, per size and the best, at `threads` threads."""
    torch.set_num_threads(threads)
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm
        reps = max(1, int(seconds / max(_time(lambda: torch.matmul(a, b)), 1e-4)))
        runs = [_time(lambda: [torch.matmul(a, b) for _ in range(reps)]) / reps for _ in range(3)]
        best[n] = 2 * n**3 / min(runs) / 1e9
    return {f"n={n}": round(v, 1) for n, v in best.items()} | {"best": round(max(best.values()), 1)}


def memory_bandwidth(threads: int, gib: float = 0.5) -> float:
    """GB/s reading a float32 tensor far larger than the caches (x.sum()), best of 5, at `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    return round(x.numel() * 4 / min(_time(x.sum) for _ in range(5)) / 1e9, 1)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(stepper: KlrlStepper, updates: int) -> dict:
    """Counted FLOPs of one update and one generation, then `updates` timed (generate, update) pairs."""
    stepper.update(stepper.collect())  # warm: first-call allocations
    batch = stepper.collect()
    with FlopCounterMode(display=False) as fc:
        stepper.update(batch)
    update_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        batch = stepper.collect()
    gen_flops = fc.get_total_flops()
    ups, gens = [], []
    for _ in range(updates):
        t0 = time.perf_counter()
        batch = stepper.collect()
        gens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stepper.update(batch)
        ups.append(time.perf_counter() - t0)
    ro = batch.rollout
    return {"update_flops": update_flops, "gen_flops": gen_flops, "updates": ups, "gens": gens,
            "B": ro.input_ids.shape[0], "P": ro.prompt_len, "R": ro.responses.shape[1]}


def figures(m: dict, n_params: int, peak: float) -> dict:
    B, P, R, N = m["B"], m["P"], m["R"], n_params
    t_upd, t_gen = statistics.median(m["updates"]), statistics.median(m["gens"])
    achieved = m["update_flops"] / t_upd / 1e9
    return {
        "params": N, "sequences": B, "prompt_tokens": P, "response_tokens": R,
        "update_s_median": round(t_upd, 3), "update_s_all": [round(x, 3) for x in m["updates"]],
        "update_gflop_counted": round(m["update_flops"] / 1e9, 1),
        "update_gflops_achieved": round(achieved, 1),
        "update_share_of_peak": round(achieved / peak, 3),
        # 6 N per trained (response) token: the usual yardstick; it leaves out the prompt positions' forward and
        # backward, the reference model's forward and attention, which the counted figure includes.
        "update_gflop_6NT": round(6 * N * B * R / 1e9, 1),
        "update_gflops_6NT": round(6 * N * B * R / t_upd / 1e9, 1),
        # forward + backward over every position (6 N) plus the reference forward (2 N): an upper yardstick.
        "update_gflop_8N_all_positions": round(8 * N * B * (P + R) / 1e9, 1),
        "generate_s_median": round(t_gen, 3),
        "generate_gflop_counted": round(m["gen_flops"] / 1e9, 1),
        "generate_gflops_achieved": round(m["gen_flops"] / t_gen / 1e9, 1),
        "generate_s_per_token": round(t_gen / R, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=THREADS, default=2)
    ap.add_argument("--updates", type=int, default=3)
    a = ap.parse_args()
    res: dict = {}
    for t in sorted({1, a.threads}):
        res[f"matmul_peak_gflops_{t}thread"] = matmul_peak(t)
        print(f"matmul peak, {t} thread(s): {res[f'matmul_peak_gflops_{t}thread']}", flush=True)
    res["memory_read_gb_per_s"] = memory_bandwidth(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stepper = KlrlStepper(WORKLOADS["smollm2"], "grpo_k3_loss", a.threads, Path(tmp) / "run")
        torch.set_num_threads(a.threads)
        m = measure(stepper, a.updates)
        stepper.close()
    res.update({"machine": machine(), "threads": a.threads,
                **figures(m, stepper.n_params, res[f"matmul_peak_gflops_{a.threads}thread"]["best"]),
                # decoding reads every weight once per token: the memory-bandwidth floor of a decode step
                "decode_floor_s_per_token": round(stepper.n_params * 4 / (res["memory_read_gb_per_s"] * 1e9), 4),
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    save(res, "flops")
    print_metrics(res)


if __name__ == "__main__":
    main()
