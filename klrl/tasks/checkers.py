"""Answer checkers: (model completion, reference answer) -> reward in [0, 1]."""

from __future__ import annotations

import functools
import re
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


# Answer extraction and the checkers of the paper's tasks. Heavy libraries are imported on first use, so that
# `klrl train` on the embedded arith task never needs them.

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none or it is unclosed."""
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    i = opens[-1].end() - 1
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may use; elsewhere it must be None.
    import threading

    return 5 if threading.current_thread() is threading.main_thread() else None


@register("math_verify")
def math_verify_match(completion: str, answer: str) -> float:
    """1 if the last \\boxed{} of the completion is mathematically equal to the reference (math-verify)."""
    pred = last_boxed(completion)
    if pred is None or len(pred) > 1000:  # an overlong "answer" is never right, and sympy may choke on it
        return 0.0
    if pred.replace(" ", "") == answer.replace(" ", ""):
        return 1.0
    from math_verify import parse, verify

    timeout = _math_verify_timeout()
    try:
        gold = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
        target = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        return float(bool(gold and target and verify(gold, target, timeout_seconds=timeout)))
    except Exception:  # a timeout or a parser crash on model output: not a correct answer
        return 0.0


_LETTER_IN_BOX = re.compile(r"^\(?([A-J])\)?(?:$|[.:)\s])")
# Only "answer" ignores case: "the answer is a bit..." must not read as option A.
_LETTER_AFTER_ANSWER = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])")


def final_letter(completion: str) -> str | None:
    """The chosen option: from the last \\boxed{} if any, else from the last "Answer: X" / "the answer is (X)"."""
    boxed = last_boxed(completion)
    if boxed is not None:
        inner = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed).strip()
        m = _LETTER_IN_BOX.match(inner)
        return m.group(1) if m else None
    found = _LETTER_AFTER_ANSWER.findall(completion)
    return found[-1] if found else None


@register("mmlu_letter")
def mmlu_letter(completion: str, answer: str) -> float:
    """1 if the final chosen letter is the reference letter."""
    return float(final_letter(completion) == answer.strip())


_ARITH_EXPR = re.compile(r"^[\d\s+\-*/().]{1,200}$")


def _countdown_score(completion: str, answer: str) -> float:
    """reasoning-gym's countdown scorer (1 solved, 0.05 wrong value or numbers, 0.01 unparseable) on the last
    <answer>...</answer> (else the last \\boxed{}); `answer` is the JSON {"numbers": [...], "target": N}."""
    import json

    from reasoning_gym.utils import extract_answer

    expr = extract_answer(completion)
    if expr is None:
        expr = last_boxed(completion)
    # The scorer runs sympy's parse_expr, which evaluates Python: model output reaches it only as plain arithmetic.
    if expr is None or not _ARITH_EXPR.match(expr) or "**" in expr:
        return 0.01
    return _countdown_dataset().score_answer(expr, {"metadata": json.loads(answer)})


@functools.lru_cache(maxsize=1)
def _countdown_dataset():
    import reasoning_gym

    return reasoning_gym.create_dataset("countdown", size=1, seed=0)


@register("countdown")
def countdown(completion: str, answer: str) -> float:
    """Binary: 1 only if the expression uses exactly the given numbers and hits the target."""
    return float(_countdown_score(completion, answer) >= 1.0)


@register("countdown_partial")
def countdown_partial(completion: str, answer: str) -> float:
    """reasoning-gym's own shaped score, small credit for a parseable but wrong answer."""
    return _countdown_score(completion, answer)
