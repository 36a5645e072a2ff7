"""`arith`: synthetic multi-digit addition, generated offline.

Two prompt styles: `plain` ("12+34=", exact match on the completion: the embedded tiny model's character task) and
`boxed` (a one-shot chat question that asks for the answer in \\boxed{}, checked by math-verify on the last \\boxed{}:
the paper's prompt style, for pretrained instruct models).

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

PROMPTS = ("plain", "boxed")


@dataclass
class ArithTaskConfig(TaskConfig):
    """Synthetic addition: in-domain operands of `digits` digits, out-of-domain `ood_digits`."""

    name: str = knob("arith", OneOf("arith"))  # this schema's task: task.name picks no other
    digits: int = knob(2, Int(1, 6))
    ood_digits: int = knob(1, Int(1, 6))
    prompt: str = knob("plain", OneOf(*PROMPTS))

    @staticmethod
    def check(cfg, root=None) -> None:
        if cfg.ood_digits == cfg.digits:
            raise ConfigError(f"task.ood_digits={cfg.ood_digits} equals task.digits; the OOD split must differ")
        if cfg.prompt != "plain" and root is not None and root.model.source == "tiny":
            raise ConfigError(f"task.prompt={cfg.prompt} needs a pretrained model's tokenizer; model=tiny reads only "
                              "task.prompt=plain (choices: plain, boxed)")

    @staticmethod
    def char_prompts(cfg) -> bool:
        return cfg.prompt == "plain"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


# One worked example, then the question (arXiv 2512.21852's \\boxed{} answer format). Measured on SmolLM2-135M-Instruct,
# one example is what makes it box its answer at all; three made it worse (README: a real pretrained model).
ONE_SHOT = ("Solve the problem and write the final answer in \\boxed{{}}.\n\n"
            "Example:\nProblem: What is 3 + 5?\nSolution: 3 + 5 = 8. The answer is \\boxed{{8}}.\n\n"
            "Problem: What is {a} + {b}?\nSolution:")
def make_problem(a: int, b: int, prompt: str = "plain") -> Problem:
    if prompt == "boxed":
        return Problem(prompt=ONE_SHOT.format(a=a, b=b), answer=str(a + b), checker="math_verify")
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b))


class ArithTask(Task):
    name = "arith"
    schema = ArithTaskConfig

    def _sample(self, rng: random.Random, ood: bool) -> Problem:
        a = _operand(rng, self.cfg.digits)
        b = _operand(rng, self.cfg.ood_digits if ood else self.cfg.digits)
        return make_problem(*((a, b) if rng.random() < 0.5 else (b, a)), prompt=self.cfg.prompt)

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        return [self._sample(rng, ood=False) for _ in range(n)]

    def sample_warmstart(self, rng: random.Random, n: int) -> list[Problem]:
        top = max(self.cfg.digits, self.cfg.ood_digits)
        return [make_problem(_operand(rng, rng.randint(1, top)), _operand(rng, rng.randint(1, top))) for _ in range(n)]

    def eval_splits(self) -> dict[str, list[Problem]]:
        # A fixed seed of its own: every run of a sweep evaluates on the same problems.
        rng = random.Random(1234)
        return {split: [self._sample(rng, split == "ood") for _ in range(self.cfg.eval_size)] for split in ("id", "ood")}
