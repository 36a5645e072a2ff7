"""Declared constraints: what a config field accepts, written next to the field, checked by one validator.

    lr: float = knob(1e-4, Positive())              # a finite number > 0
    baseline: str = knob("rloo", OneOf(*BASELINES))
    micro_batch_size: Optional[int] = knob(None, Int(1))   # None passes: "unset" is always valid for Optional

A constraint is a callable `value -> bool`, with `valid` saying in words what it accepts; the validator
(`klrl.config.validate`) turns a failure into one line: `key=value is not valid; it must be <valid>`.

A knob that only acts in some configurations declares where (`applies=`); set anywhere else it would be silently
ignored, so the validator refuses it: `key=value has no effect <here>; it needs <where>`.

    reward_form: Optional[str] = knob(None, OneOf(*REWARD_FORMS), applies=IN_REWARD)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from dataclasses import MISSING, field
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Iterable

CHECKS = "klrl_checks"  # the dataclass field metadata keys
APPLIES = "klrl_applies"


class Applies:
    """Where a knob acts: `when(cfg)` is true there; `needs` says where in words, `here(cfg)` says why it is not.
    A knob set (not None) where `when` is false is refused."""

    def __init__(self, when: Callable[[Any], bool], needs: str, here: Callable[[Any], str]):
        self.when, self.needs, self.here = when, needs, here

    def __and__(self, other: "Applies") -> "Applies":
        return Applies(lambda c: self.when(c) and other.when(c), f"{self.needs} and {other.needs}",
                       lambda c: self.here(c) if not self.when(c) else other.here(c))


def knob(default: Any = MISSING, *checks: "Constraint", factory: Callable[[], Any] | None = None,
         applies: Applies | None = None) -> Any:
    """A dataclass field with its constraints (default, or default_factory for mutable defaults) and, for a knob
    that acts only in some configurations, where it applies."""
    meta = {CHECKS: checks, APPLIES: applies}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Constraint:
    valid: str = ""

    def __call__(self, value: Any) -> bool:  # True when the value is acceptable
        raise NotImplementedError


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class Range(Constraint):
    """A finite number within [lo, hi] (open ends with lo_open / hi_open)."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        parts = []
        if lo > -math.inf:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi < math.inf:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        self.valid = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def __call__(self, value: Any) -> bool:
        if not _number(value) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


def Positive() -> Range:  # noqa: N802 (reads as a type)
    return Range(0.0, lo_open=True)


def NonNegative() -> Range:  # noqa: N802
    return Range(0.0)


class Int(Constraint):
    """An integer within [lo, hi]."""

    def __init__(self, lo: int = -(2**63), hi: int = 2**63 - 1):
        self.lo, self.hi = lo, hi
        if hi >= 2**62:
            self.valid = f"an integer >= {lo}"
        else:
            self.valid = f"an integer in {lo}..{hi}"

    def __call__(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi


class OneOf(Constraint):
    """One of a set of choices; `choices` may be a callable, read at check time (a registry that grows)."""

    def __init__(self, *choices: Any, dynamic: Callable[[], Iterable[Any]] | None = None):
        self._choices, self._dynamic = choices, dynamic

    @property
    def choices(self) -> tuple:
        return tuple(self._dynamic()) if self._dynamic else self._choices

    @property
    def valid(self) -> str:  # type: ignore[override]
        return "one of: " + ", ".join(map(str, self.choices))

    def __call__(self, value: Any) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)


class NonEmpty(Constraint):
    valid = "a non-empty string"

    def __call__(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())


class Name(Constraint):
    """A plain name, safe inside a file name (a cache path, a run directory): letters, digits and . _ + -."""

    valid = "a name of letters, digits and . _ + - (not starting with .)"

    def __call__(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(r"[\w+-][\w.+-]*", value, re.ASCII) is not None


class Each(Constraint):
    """A list of exactly `length` items (any length when None), each passing `item`."""

    def __init__(self, item: Constraint, length: int | None = None):
        self.item, self.length = item, length
        self.valid = (f"a list of {length} " if length else "a list of ") + f"values, each {item.valid}"

    def __call__(self, value: Any) -> bool:
        try:
            items = list(value)
        except TypeError:
            return False
        return (self.length is None or len(items) == self.length) and all(self.item(v) for v in items)


class Writable(Constraint):
    """A path klrl can write: a directory (kind="dir") or a file (kind="file") that exists and can be written, or
    can be created under its nearest existing parent. Checked by trying (`unwritable`), which leaves nothing."""

    def __init__(self, kind: str = "dir"):
        self.kind = kind
        self.valid = f"a path where a {'directory' if kind == 'dir' else 'file'} can be created and written"

    def __call__(self, value: Any) -> bool:
        return isinstance(value, (str, os.PathLike)) and unwritable(value, self.kind) is None


NAME_MAX, PATH_MAX = 255, 4096  # bytes of one path component and of a whole path (Linux)


def unwritable(path: str | os.PathLike, kind: str = "dir") -> str | None:
    """Why `path` cannot be written as a directory (kind="dir") or a file, or None. Creates nothing that stays: it
    probes the nearest existing directory by making (and removing) a temporary directory in it, and puts back
    that directory's access and modification times."""
    text = os.fspath(path)
    if not text.strip():
        return "the path is empty"
    p = Path(text).expanduser()
    if any(len(os.fsencode(part)) > NAME_MAX for part in p.parts):
        return f"a name in it is longer than {NAME_MAX} bytes"
    if len(os.fsencode(str(p.absolute()))) >= PATH_MAX:
        return f"it is longer than {PATH_MAX - 1} bytes"
    try:
        if p.is_dir() and kind == "file":
            return "it is a directory"
        if p.exists() and not p.is_dir() and kind == "dir":
            return "it exists and is not a directory"
        if p.exists() and kind == "file" and not os.access(p, os.W_OK):
            return "the file is read-only"
        probe = p if p.is_dir() else p.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a directory"
        st = probe.stat()
        os.rmdir(tempfile.mkdtemp(prefix=".klrl-probe-", dir=probe))
        os.utime(probe, ns=(st.st_atime_ns, st.st_mtime_ns))  # an existing run's directory keeps its times
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def flag(constraint: Constraint, parse: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse `type`: parse the text, then check it against a declared constraint (one-line message)."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text
        if not constraint(value):
            shown = text if text and text.strip() == text else repr(text)
            raise argparse.ArgumentTypeError(f"{shown} is not valid; it must be {constraint.valid}")
        return value

    return convert
