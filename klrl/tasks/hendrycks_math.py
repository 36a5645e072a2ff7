"""`math`: the paper's main setup. RL on the Hendrycks MATH train set, in-domain evaluation on MATH-500,
out-of-domain evaluation on MMLU college physics / chemistry / biology.

Data (hub ids by default; any `*.path` may be a local directory with the same layout):
- train: `EleutherAI/hendrycks_math`, one folder per subject, `<subject>/train-00000-of-00001.parquet` with columns
  problem, level ("Level 1".."Level 5"), type, solution (the reference is its last \\boxed{}). All seven subjects:
  7,500 problems. Chosen over single-file mirrors because it is the original split in the original columns.
- id: `HuggingFaceH4/MATH-500`, `test.jsonl` with problem, solution, answer, subject, level (int), unique_id.
- ood: `cais/mmlu` test splits, prompted and checked as in `mmlu_college`.
The prompt is the Qwen-math chain-of-thought instruction; the checker compares the last \\boxed{} with math-verify.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import List

from klrl.tasks.checkers import last_boxed
from klrl.config.constraints import OneOf, knob
from klrl.config.schema import TaskConfig
from klrl.errors import ConfigError
from klrl.tasks.base import Problem, Task
from klrl.hub import DataSource, check_source, fixed_subset, load_rows
from klrl.tasks.mmlu import COLLEGE, check_mmlu, load_mmlu

log = logging.getLogger(__name__)
SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
            "precalculus"]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class MathTaskConfig(TaskConfig):
    name: str = knob("math", OneOf("math"))  # this schema's task: task.name picks no other
    train_data: DataSource = field(default_factory=lambda: DataSource(path="EleutherAI/hendrycks_math"))
    train_subjects: List[str] = field(default_factory=lambda: list(SUBJECTS))
    eval_data: DataSource = field(default_factory=lambda: DataSource(path="HuggingFaceH4/MATH-500"))
    ood_data: DataSource = field(default_factory=lambda: DataSource(path="cais/mmlu"))
    ood_subjects: List[str] = field(default_factory=lambda: list(COLLEGE))
    ood_split: str = "test"

    @staticmethod
    def check(cfg, root=None) -> None:
        """Cheap (values, data present), before any model is built."""
        if not cfg.train_subjects or not set(cfg.train_subjects) <= set(SUBJECTS):
            raise ConfigError(f"task.train_subjects={list(cfg.train_subjects)} is not valid; "
                              f"choose from: {', '.join(SUBJECTS)}")
        check_source(cfg.train_data, "task.train_data")
        check_source(cfg.eval_data, "task.eval_data")
        check_mmlu(cfg.ood_data, cfg.ood_subjects, [cfg.ood_split], "task.ood_data")



def math_problem(question: str, answer: str, **meta) -> Problem:
    return Problem(prompt=f"{question.strip()}\n{INSTRUCTION}", answer=answer, checker="math_verify", meta=meta)


def load_math_train(src: DataSource, subjects: list[str]) -> list[Problem]:
    rows = load_rows(src, [f"{s}/train-*.parquet" for s in subjects], "task.train_data")
    problems = [math_problem(r["problem"], a, level=r["level"], type=r["type"])
                for r in rows if (a := last_boxed(r["solution"]))]
    if len(problems) < len(rows):  # a handful of MATH solutions state the answer without \boxed{}
        log.info("MATH train: %d of %d problems have no \\boxed{} answer, left out", len(rows) - len(problems), len(rows))
    return problems


def load_math500(src: DataSource) -> list[Problem]:
    return [math_problem(r["problem"], r["answer"], level=r["level"], subject=r["subject"], unique_id=r["unique_id"])
            for r in load_rows(src, ["test.jsonl"], "task.eval_data")]


class MathTask(Task):
    name = "math"
    schema = MathTaskConfig

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.train = load_math_train(cfg.train_data, list(cfg.train_subjects))

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        if n <= len(self.train):
            return rng.sample(self.train, n)
        return rng.choices(self.train, k=n)

    def eval_splits(self) -> dict[str, list[Problem]]:
        ood = load_mmlu(self.cfg.ood_data, list(self.cfg.ood_subjects), self.cfg.ood_split, "task.ood_data")
        return {"id": fixed_subset(load_math500(self.cfg.eval_data), self.cfg.eval_size),
                "ood": fixed_subset(ood, self.cfg.eval_size)}
