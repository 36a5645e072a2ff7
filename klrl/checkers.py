"""Answer checkers: (model completion, reference answer) -> reward in [0, 1]."""

from __future__ import annotations

from typing import Callable

Checker = Callable[[str, str], float]
CHECKERS: dict[str, Checker] = {}


def register(name: str) -> Callable[[Checker], Checker]:
    def wrap(fn: Checker) -> Checker:
        CHECKERS[name] = fn
        return fn

    return wrap


@register("exact")
def exact_match(completion: str, answer: str) -> float:
    """1 if the completion, stripped of surrounding whitespace, is exactly the answer."""
    return float(completion.strip() == answer.strip())
