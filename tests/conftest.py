"""Shared fixtures: a warm-start cache for the session, composing configs, and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from klrl.cli.compose import compose
from klrl.paths import CONF_DIR  # noqa: F401  (the tests' way to conf/)

# Small enough that a test's warm start takes ~1 s, then is cached for the whole session.
FAST = [
    "model.warmstart.steps=40",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "eval.n_samples=1",
    "eval.bootstrap=50",
    "task.eval_size=8",
    "progress=false",
    "logger=none",  # last: FAST[:-1] keeps the default logger (TensorBoard)
]


@pytest.fixture(scope="session", autouse=True)
def klrl_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("klrl_cache")
    os.environ["KLRL_CACHE"] = str(cache)
    return cache


def compose_cfg(*overrides: str):
    """A `klrl train` config, composed as the trainer's is (not validated: tests validate when they mean to)."""
    return compose(list(overrides), check=False)


@pytest.fixture(scope="module")
def tiny():
    """(cfg, the warm-started tiny model in eval mode, its tokenizer, prompts): 24 in-domain (two-digit) and 24
    out-of-domain (one-digit) arithmetic problems, so prompts of different lengths. One per test module."""
    import random

    from klrl.models.registry import load_model
    from klrl.sampling.rollout import encode_prompts
    from klrl.tasks import TASKS

    cfg = compose_cfg(*FAST)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    problems = task.sample_train(random.Random(0), 24) + list(task.eval_splits()["ood"][:24])
    return cfg, model.eval(), tok, encode_prompts(tok, [p.prompt for p in problems], False)


def run_klrl(*args: str, cwd: Path, check: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "klrl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f"klrl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops run faster, and matmul sums (which depend on the thread count)
    compare equal with a one-thread generator's."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
