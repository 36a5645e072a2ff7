"""What every benchmark script does with its figures: name the machine, keep them under results/, print them."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


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
