"""`countdown`: reach a target with + - * / using every given number once, from reasoning-gym's generator and
scorer (offline, seedable), as in the paper's Qwen3-4B-Instruct-2507 runs.

A problem is reasoning-gym's item `idx` of a generator seeded with `seed`: Random(seed + idx) draws it. Training
draws fresh problems from a generator seeded with the run's seed (uniform random indices, so a resumed run replays
the same problems). Evaluation uses generators seeded with `eval_seed`: in-domain, the training setting
(`min_numbers`..`max_numbers` numbers); out-of-domain, the harder `ood_min_numbers`..`ood_max_numbers`.
The prompt is reasoning-gym's "default" system instruction (answer inside <answer></answer>) followed by its
question. Reward: 1 if solved, else 0; `partial_credit: true` gives reasoning-gym's shaped 0.05 / 0.01 instead.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
from dataclasses import dataclass

from klrl.config.constraints import Int, OneOf, knob
from klrl.config.schema import TaskConfig
from klrl.errors import ConfigError
from klrl.tasks.base import Problem, Task


@dataclass
class CountdownTaskConfig(TaskConfig):
    name: str = knob("countdown", OneOf("countdown"))  # this schema's task: task.name picks no other
    min_numbers: int = knob(3, Int(2, 12))
    max_numbers: int = knob(4, Int(2, 12))
    ood_min_numbers: int = knob(5, Int(2, 12))
    ood_max_numbers: int = knob(6, Int(2, 12))
    min_value: int = knob(1, Int(1, 10**6))
    max_value: int = knob(100, Int(1, 10**6))
    min_target: int = knob(100, Int(1, 10**9))
    max_target: int = knob(999, Int(1, 10**9))
    partial_credit: bool = False
    eval_seed: int = knob(1234, Int(0, 2**30 - 1))  # training draws its problems from the seeds above 2**31

    @staticmethod
    def check(cfg, root=None) -> None:
        """Cheap (values, data present), before any model is built."""
        if importlib.util.find_spec("reasoning_gym") is None:
            raise ConfigError("task=countdown needs reasoning-gym; install it with `pip install reasoning-gym`")
        for lo, hi in (("min_numbers", "max_numbers"), ("ood_min_numbers", "ood_max_numbers"),
                       ("min_value", "max_value"), ("min_target", "max_target")):
            if cfg[lo] > cfg[hi]:
                raise ConfigError(f"task.{lo}={cfg[lo]} is above task.{hi}={cfg[hi]}; a range needs min <= max")
        if (cfg.min_numbers, cfg.max_numbers) == (cfg.ood_min_numbers, cfg.ood_max_numbers):
            raise ConfigError("task.ood_min_numbers..ood_max_numbers is the training range; the OOD split must differ")


def generator(cfg, seed: int, ood: bool):
    from reasoning_gym.games.countdown import CountdownConfig, CountdownDataset

    lo, hi = (cfg.ood_min_numbers, cfg.ood_max_numbers) if ood else (cfg.min_numbers, cfg.max_numbers)
    return CountdownDataset(CountdownConfig(
        min_numbers=lo, max_numbers=hi, min_value=cfg.min_value, max_value=cfg.max_value,
        min_target=cfg.min_target, max_target=cfg.max_target, seed=seed, size=2**32,
    ))


def make_problem(item: dict, checker: str) -> Problem:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    md = item["metadata"]
    return Problem(
        prompt=f"{SYSTEM_PROMPTS['default']}\n{item['question']}",
        answer=json.dumps({"numbers": md["numbers"], "target": md["target"]}),
        checker=checker,
        meta={"expression": item["answer"], "source_index": md["source_index"]},
    )


def draw(gen, idx: int, checker: str) -> Problem | None:
    try:
        return make_problem(gen[idx], checker)
    except ValueError:  # reasoning-gym gave up finding an expression within the target range for this index
        return None


class CountdownTask(Task):
    name = "countdown"
    schema = CountdownTaskConfig
    EVAL_ONLY = (*Task.EVAL_ONLY, "ood_min_numbers", "ood_max_numbers", "eval_seed")

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.checker = "countdown_partial" if cfg.partial_credit else "countdown"
        self.train_gen = generator(cfg, seed, ood=False)

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            # Indices from 2**31 on: Random(seed + idx) never meets an evaluation generator's Random(eval_seed + i).
            if (p := draw(self.train_gen, 2**31 + rng.randrange(2**31), self.checker)) is not None:
                out.append(p)
        return out

    def eval_splits(self) -> dict[str, list[Problem]]:
        splits = {}
        for split in ("id", "ood"):
            gen = generator(self.cfg, self.cfg.eval_seed, ood=split == "ood")
            drawn = (p for p in (draw(gen, i, self.checker) for i in range(2**30)) if p is not None)
            splits[split] = list(itertools.islice(drawn, self.cfg.eval_size))
        return splits
