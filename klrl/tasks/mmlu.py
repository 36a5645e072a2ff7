"""`mmlu_college`: MMLU college physics / chemistry / biology (`cais/mmlu`), the paper's out-of-domain benchmark,
as a task of its own.

Hub layout: `<subject>/<split>-00000-of-00001.parquet` with columns question, subject, choices (4 strings) and
answer (class label 0-3); splits dev (5 rows a subject), validation and test. Evaluation: one split per subject on
`eval_split` (the paper reports them separately). Training, if wanted: `train_splits` of the same subjects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List

from klrl.config.constraints import OneOf, knob
from klrl.config.schema import TaskConfig
from klrl.errors import ConfigError
from klrl.tasks.base import Problem, Task
from klrl.hub import DataSource, check_source, fixed_subset, load_rows

LETTERS = "ABCDEFGHIJ"
COLLEGE = ["college_physics", "college_chemistry", "college_biology"]
SPLITS = ("dev", "validation", "test")


@dataclass
class MmluTaskConfig(TaskConfig):
    name: str = knob("mmlu_college", OneOf("mmlu_college"))  # this schema's task: task.name picks no other
    data: DataSource = field(default_factory=lambda: DataSource(path="cais/mmlu"))
    subjects: List[str] = field(default_factory=lambda: list(COLLEGE))
    train_splits: List[str] = field(default_factory=lambda: ["dev", "validation"])
    eval_split: str = "test"

    @staticmethod
    def check(cfg, root=None) -> None:
        """Cheap (values, data present), before any model is built."""
        check_mmlu(cfg.data, cfg.subjects, [*cfg.train_splits, cfg.eval_split], "task.data")
        if not cfg.train_splits:
            raise ConfigError("task.train_splits is empty; training needs at least one of: dev, validation")
        if cfg.eval_split in cfg.train_splits:
            raise ConfigError(f"task.train_splits={list(cfg.train_splits)} contains the evaluation split {cfg.eval_split!r}")



def make_problem(row: dict) -> Problem:
    subject = row["subject"]
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    prompt = (
        f"The following is a multiple choice question about {subject.replace('_', ' ')}. Think step by step, then "
        f"give the letter of the correct option within \\boxed{{}}.\n\n{row['question'].strip()}\n\n{options}"
    )
    return Problem(prompt=prompt, answer=LETTERS[int(row["answer"])], checker="mmlu_letter", meta={"subject": subject})


def load_mmlu(src: DataSource, subjects: list[str], split: str, what: str) -> list[Problem]:
    return [make_problem(r) for r in load_rows(src, [f"{s}/{split}-*.parquet" for s in subjects], what)]


def check_mmlu(src: DataSource, subjects, splits, what: str) -> None:
    if not subjects:
        raise ConfigError(f"{what}: no subjects; name at least one MMLU subject, e.g. {COLLEGE[0]}")
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"MMLU split {split!r} is not valid; choose from: {', '.join(SPLITS)}")
    check_source(src, what)


class MmluTask(Task):
    name = "mmlu_college"
    schema = MmluTaskConfig

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.train = [p for split in cfg.train_splits for p in load_mmlu(cfg.data, cfg.subjects, split, "task.data")]

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        if n <= len(self.train):
            return rng.sample(self.train, n)
        return rng.choices(self.train, k=n)

    def eval_splits(self) -> dict[str, list[Problem]]:
        return {s: fixed_subset(load_mmlu(self.cfg.data, [s], self.cfg.eval_split, "task.data"), self.cfg.eval_size)
                for s in self.cfg.subjects}
