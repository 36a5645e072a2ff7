"""What every benchmark script does with its figures: name the machine, keep them under results/, print them."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from klrl.config.constraints import Int, flag

RESULTS = Path(__file__).parent / "results"
# argparse types of the scripts' common flags: a bad value is a one-line usage error, before anything is built
THREADS = flag(Int(1, 4096), int)
COUNT = flag(Int(1), int)  # steps, repetitions
NONNEG = flag(Int(0), int)  # warm-up steps dropped


def machine() -> str:
    n = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{n} thread{'' if n == 1 else 's'}")


def save(res: dict, name: str) -> Path:
    """benchmarks/results/<name>.json: the figures the README quotes."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    return out


def print_metrics(res: dict) -> None:
    print("| metric | value |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v} |")
