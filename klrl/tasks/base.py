"""What a task is: problems with reference answers, evaluation splits, and a real answer checker."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from klrl.tasks.checkers import CHECKERS


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question as the user would ask it; chat templates are applied by the model side
    answer: str  # the reference answer the checker compares against
    checker: str = "exact"  # key into klrl.tasks.checkers.CHECKERS
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Task:
    """A verifiable task. Subclasses set `name` and `schema` (a klrl.config.schema.TaskConfig subclass, whose
    `check(cfg, root)` hook the validator runs), and implement `sample_train` and `eval_splits`."""

    name: ClassVar[str]
    schema: ClassVar[type]
    # Config keys that only evaluation reads: a warm start does not depend on them (nor on its cache key).
    EVAL_ONLY: ClassVar[tuple[str, ...]] = ("name", "max_new_tokens", "eval_size")

    def __init__(self, cfg: Any, seed: int):
        self.cfg, self.seed = cfg, seed

    def sample_train(self, rng: random.Random, n: int) -> list[Problem]:
        raise NotImplementedError

    def sample_warmstart(self, rng: random.Random, n: int) -> list[Problem]:
        """Problems for a supervised warm start (the "pre-training" of the embedded default)."""
        return self.sample_train(rng, n)

    def warmstart_signature(self) -> dict:
        """What determines `sample_warmstart`'s problems: the task's name and every config key but EVAL_ONLY's."""
        from omegaconf import OmegaConf

        keys = [k for k in self.cfg if k not in self.EVAL_ONLY]
        return {"task": self.name, **{k: OmegaConf.to_container(self.cfg, resolve=True)[k] for k in keys}}

    def eval_splits(self) -> dict[str, Sequence[Problem]]:
        """{"id": in-domain problems, "ood": out-of-domain problems} (fixed, independent of the run seed)."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        return CHECKERS[problem.checker](completion, problem.answer)
