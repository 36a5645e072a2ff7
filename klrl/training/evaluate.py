"""Evaluation: pass@1 averaged over n samples per problem at `eval.temperature` / `eval.top_p` (default 1.0 / 1.0,
the paper's protocol; independent of training's sampling) and greedy accuracy, each with a bootstrap confidence
interval over problems."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from klrl.sampling.generation import Generator, make_generator
from klrl.sampling.rollout import decode_responses, encode_prompts
from klrl.tasks.base import Problem, Task


def bootstrap_ci(scores: Sequence[float], reps: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-problem scores (problems resampled with replacement)."""
    x = np.asarray(scores, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def score_problems(generator: Generator, tokenizer, task: Task, problems: Sequence[Problem], n: int, greedy: bool,
                   max_new_tokens: int, chat_template: bool, temperature: float = 1.0, top_p: float = 1.0,
                   chunk: int = 512, bar=None) -> np.ndarray:
    """[len(problems)] mean score of each problem over its n samples (n = 1 when greedy); `bar` (tqdm) counts the
    responses generated."""
    n = 1 if greedy else n
    prompts = encode_prompts(tokenizer, [p.prompt for p in problems], chat_template)
    flat = [(i, ids) for i, ids in enumerate(prompts) for _ in range(n)]
    scores = np.zeros(len(problems))
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        ro = generator.generate([ids for _, ids in part], max_new_tokens, temperature, top_p, greedy=greedy)
        for (i, _), text in zip(part, decode_responses(tokenizer, ro)):
            scores[i] += task.score(problems[i], text) / n
        if bar is not None:
            bar.update(len(part))
    return scores


def eval_sampling(cfg) -> dict[str, float]:
    """How pass@1 samples: recorded beside every evaluation (summary.json, eval.json, `klrl table`)."""
    return {"temperature": float(cfg.eval.temperature), "top_p": float(cfg.eval.top_p)}


def evaluate(model, tokenizer, task: Task, splits: dict[str, Sequence[Problem]], cfg, seed: int,
             generator: Generator | None = None) -> dict[str, float]:
    """Metrics named eval/<split>/<pass@1|greedy>[_lo|_hi]. `generator` must hold `model`'s weights; without one,
    a generator of cfg's backend is made for this call."""
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    own = generator is None
    gen = make_generator(cfg, model, tokenizer) if own else generator
    modes = [("pass@1", False)] + ([("greedy", True)] if cfg.eval.greedy else [])
    total = sum(len(problems) * (1 if greedy else cfg.eval.n_samples) for problems in splits.values()
                for _, greedy in modes)
    # its own bar, gone when done: an evaluation of n samples per problem on a large split takes minutes
    bar = tqdm(total=total, desc="eval", unit="response", leave=False, dynamic_ncols=True,
               disable=not cfg.get("progress", True))
    try:
        for split, problems in splits.items():
            for name, greedy in modes:
                torch.manual_seed(seed)
                s = score_problems(gen, tokenizer, task, problems, cfg.eval.n_samples, greedy, cfg.task.max_new_tokens,
                                   cfg.model.chat_template, cfg.eval.temperature, cfg.eval.top_p,
                                   chunk=cfg.eval.batch_size, bar=bar)
                lo, hi = bootstrap_ci(s, cfg.eval.bootstrap, seed=seed)
                out[f"eval/{split}/{name}"] = float(s.mean())
                out[f"eval/{split}/{name}_lo"], out[f"eval/{split}/{name}_hi"] = lo, hi
    finally:
        bar.close()
        if own:
            gen.close()
    model.train(was_training)
    return out
