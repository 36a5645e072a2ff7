"""What both sides of the GPU kit run, and how they time and report it (no klrl import here: see klrl_adapter.py).

The workload: a randomly initialised Qwen2.5-shaped causal LM (real-size architecture,
nothing downloaded), PROMPTS prompts x GROUP samples per step, PROMPT_LEN random prompt ids, NEW_TOKENS sampled
tokens at temperature 1, a random 0/1 reward per sequence, k3 KL in the loss with beta 0.05, one AdamW step (lr 1e-6)
per batch over micro-batches of MICRO sequences, activation checkpointing on. Steps 1..warmup are dropped; medians
over the rest. Each bench script writes ONE JSON file (rewritten after every step, so a step killed by its timeout
still leaves the steps it finished, with status "partial").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# Qwen2.5 shapes from their published configs (vocab 151936: what the logits and the embedding cost); "smoke" is a
# seconds-long CPU check of the kit itself.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
PAD, BOS, EOS = 0, 1, 2  # the random models' special ids (klrl's char tokenizer and trl_bench's tokenizer agree)

PRECISIONS = {
    # klrl: FSDP-of-1 (model.fsdp=true, model.param_dtype=float32, model.dtype=bfloat16), reference in bf16.
    # TRL: float32 weights (policy and reference) + Trainer bf16=True (bf16 autocast) on CUDA.
    "mixed": "float32 master weights, bf16 compute",
    # both: bf16 weights, no master copy (klrl: model.dtype=bfloat16 without FSDP)
    "bf16": "pure bf16",
}


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--precision", choices=PRECISIONS, default="mixed")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the JSON file this step writes")


def model_config(shape: str):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen2", **SHAPES[shape], pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)


class Clock:
    """Wall time and peak allocated GPU memory of one phase (synchronised on CUDA; no memory figures on CPU)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self) -> float:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def stop(self, t0: float) -> tuple[float, float | None]:
        """(seconds since t0, peak GiB since start())"""
        self.sync()
        dt = time.perf_counter() - t0
        return dt, (self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None)


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device


def step_figures(rows: list[dict], warmup: int) -> dict:
    """Medians over the measured steps (those after the warm-up) of rows with generate_s, train_s, tokens and the
    two peaks; the warm-up step alone if nothing was measured yet (status then says so)."""
    measured = rows[warmup:]
    use = measured or rows[:1]
    if not use:
        return {"measured_steps": 0}
    med = lambda k: statistics.median(r[k] for r in use)  # noqa: E731
    g, t, n = med("generate_s"), med("train_s"), med("tokens")
    peak = lambda k: (round(max(r[k] for r in use), 2) if use[0].get(k) is not None else None)  # noqa: E731
    return {
        "measured_steps": len(measured),
        "completion_tokens": round(n, 1),
        "step_s": round(g + t, 3), "generate_s": round(g, 3), "train_s": round(t, 3),
        "generate_tokens_per_s": round(n / g, 1) if g else None,
        "train_tokens_per_s": round(n / t, 1) if t else None,
        "step_tokens_per_s": round(n / (g + t), 1) if g + t else None,
        "generate_peak_gib": peak("generate_peak_gib"), "train_peak_gib": peak("train_peak_gib"),
        "per_step_generate_s": [round(r["generate_s"], 3) for r in rows],
        "per_step_train_s": [round(r["train_s"], 3) for r in rows],
    }


def write_result(path: str | os.PathLike, res: dict) -> None:
    """Atomic write, so that a step killed mid-write leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)
