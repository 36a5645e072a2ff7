"""`arith`: synthetic multi-digit addition with exact-match reward, generated offline.

RL trains on the in-domain split: both operands have `digits` digits. Out-of-domain: one operand has `ood_digits`
digits. The supervised warm start covers every operand length up to the larger of the two, the way pre-training
covers more than the RL data: out-of-domain here means "outside the RL distribution", as MMLU is for a model
RL-trained on MATH, so it measures what RL on one distribution does to another the model knows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from klrl.config.constraints import Int, OneOf, knob
from klrl.config.schema import TaskConfig
from klrl.errors import ConfigError
from klrl.tasks.base import Problem, Task


@dataclass
class ArithTaskConfig(TaskConfig):
    """Synthetic addition: in-domain operands of `digits` digits, out-of-domain `ood_digits`."""

    name: str = knob("arith", OneOf("arith"))  # this schema's task: task.name picks no other
    digits: int = knob(2, Int(1, 6))
    ood_digits: int = knob(1, Int(1, 6))

    @staticmethod
    def check(cfg, root=None) -> None:
        if cfg.ood_digits == cfg.digits:
            raise ConfigError(f"task.ood_digits={cfg.ood_digits} equals task.digits; the OOD split must differ")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def make_problem(a: int, b: int) -> Problem:
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b))


class ArithTask(Task):
    name = "arith"
    schema = ArithTaskConfig

    def _sample(self, rng: random.Random, ood: bool) -> Problem:
        a = _operand(rng, self.cfg.digits)
        b = _operand(rng, self.cfg.ood_digits if ood else self.cfg.digits)
        return make_problem(*((a, b) if rng.random() < 0.5 else (b, a)))

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        return [self._sample(rng, ood=False) for _ in range(n)]

    def sample_warmstart(self, rng: random.Random, n: int) -> list[Problem]:
        top = max(self.cfg.digits, self.cfg.ood_digits)
        return [make_problem(_operand(rng, rng.randint(1, top)), _operand(rng, rng.randint(1, top))) for _ in range(n)]

    def eval_splits(self) -> dict[str, list[Problem]]:
        # A fixed seed of its own: every run of a sweep evaluates on the same problems.
        rng = random.Random(1234)
        return {split: [self._sample(rng, split == "ood") for _ in range(self.cfg.eval_size)] for split in ("id", "ood")}
