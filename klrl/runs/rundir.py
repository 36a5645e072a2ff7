"""The run directory: the one API that reads and writes it. The trainer, `klrl status`, `klrl table`, `klrl eval`
and the launchers all go through `RunDir`.

Layout:
  .hydra/config.yaml   the run's config (its single stored copy), .hydra/overrides.yaml, .hydra/hydra.yaml
  summary.json         status (running | completed | diverged | failed), step reached, evaluations, versions
  metrics.jsonl        one JSON object per training step, evaluation, divergence
  checkpoint.pt        model, optimizer, scheduler, RNG states, step (and the lag ring)
  heartbeat            touched every few seconds while a process trains the run
  tb/, train.log       TensorBoard events, the log

Every file is written atomically (temporary file, fsync, rename); metrics lines with a single write.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from klrl.errors import ConfigError

SUMMARY, METRICS, CHECKPOINT, HEARTBEAT = "summary.json", "metrics.jsonl", "checkpoint.pt", "heartbeat"
CONFIG, OVERRIDES, HYDRA = Path(".hydra") / "config.yaml", Path(".hydra") / "overrides.yaml", Path(".hydra") / "hydra.yaml"
# Config keys that say how a run executes, not what it computes: the one list. They may change when a run resumes
# (with `steps`, which extends it), never name a run directory, and never split rows of `klrl table`.
OPERATIONAL = frozenset({"resume", "progress", "tensorboard", "logger", "ckpt_every", "extras_every", "device",
                         "cache_dir"})
RESUMABLE = OPERATIONAL | {"steps"}
FINAL = ("completed", "diverged")
STATUSES = ("pending", "running", "stale", "completed", "diverged", "failed", "unreadable", "unknown")
HEARTBEAT_S = 10.0  # a training process touches `heartbeat` this often
STALE_S = float(os.environ.get("KLRL_STALE_S", 120.0))  # a "running" run with an older heartbeat has no process

MAX_NAME = 120  # bytes of a default run name before it is shortened with a hash
NEST_DEPTH = 3  # how deep below a directory a run is looked for (a sweep's runs: one or two levels down)


def is_run(path: Path) -> bool:
    """Whether `path` is a run directory: a run writes its config or its summary first."""
    return (path / CONFIG).is_file() or (path / SUMMARY).is_file()


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory that `path` lies strictly inside, or None."""
    return next((p for p in Path(path).expanduser().absolute().parents if is_run(p)), None)


def run_below(path: str | Path) -> Path | None:
    """A run directory strictly below `path` (at most NEST_DEPTH levels down), or None. `klrl table` and `klrl
    status` read every run below a directory, so a run placed above others would be read with them."""
    root = Path(path).expanduser()
    for depth in range(1, NEST_DEPTH + 1):
        for marker in (CONFIG, Path(SUMMARY)):
            hit = next(root.glob(str(Path(*["*"] * depth) / marker)), None)
            if hit is not None:
                return Path(*hit.parts[: len(hit.parts) - len(marker.parts)])
    return None


def check_nesting(key: str, path: str | Path, kind: str) -> None:
    """ConfigError (one line) if what goes at `path` would nest with existing runs. kind "run": a new run, refused
    inside a run or in a directory that holds runs below it. "sweep": a sweep dir, refused inside or at a run, or
    where runs lie below that are not an earlier sweep's (a sweep has its multirun.yaml). "parent": the directory
    new runs are created in, refused inside or at a run. `klrl table` and `klrl status` read every run below a
    directory: nested runs would be read, and hidden, together."""
    try:
        root = Path(path).expanduser()
        outer = root if kind != "run" and is_run(root) else enclosing_run(root)
        holds = kind == "run" or (kind == "sweep" and not (root / "multirun.yaml").is_file())
        inner = run_below(root) if holds and root.is_dir() and not is_run(root) else None
    except OSError:  # a name too long, a directory that cannot be listed: for the writability check to explain
        return
    if outer is not None:
        where = "is a run directory" if outer == root else f"is inside the run {str(outer)!r}"
        raise ConfigError(f"{key}={str(path)!r} {where}, and a run directory holds one run; choose a directory "
                          "outside it")
    if inner is not None:
        raise ConfigError(f"{key}={str(path)!r} already holds other runs (e.g. {str(inner)!r}), which `klrl table` "
                          "and `klrl status` would read with this one; choose a new directory")


def run_name(overrides: list[str]) -> str:
    """`algo=grpo,estimator=k3,placement=loss`: a run's non-default choices (its command line's overrides), keys
    that may change on resume aside. Names run directories and the run in W&B and MLflow."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in RESUMABLE]
    name = re.sub(r"[^\w.=,+@-]", "_", ",".join(keep)) or "defaults"
    if len(name.encode()) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


# --- files ----------------------------------------------------------------------------------------------------------


def _temp_file(directory: Path, prefix: str) -> tuple[int, str]:
    """A new file in `directory`, as tempfile.mkstemp makes one but with the mode a plain open() gives (0666 less
    the umask), not mkstemp's 0600: what atomic_write leaves is as readable as any file the process writes."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(tempfile.TMP_MAX):
        path = directory / f"{prefix}{secrets.token_hex(6)}"
        try:
            return os.open(path, flags, 0o666), str(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`: a reader (or a crash) never
    sees half a file, and a failure (disk full) leaves the previous file intact. The file gets the mode open() would
    give it (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(every complete record of a JSON-lines file, the number of lines that could not be read): a torn line (a
    process killed mid-write) is skipped, never raised."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
    return out, bad


def rng_state() -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested config dicts. A config group whose option
    changed (its `name`: placement=reward -> loss) is one entry, `placement: 'reward' -> 'loss'`: the rest of its
    keys follow from the option."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        na, nb = (v.get("name") if isinstance(v, dict) else None for v in (va, vb))
        if (na is not None or nb is not None) and na != nb:
            out.append(f"{prefix}{k}: {na!r} -> {nb!r}")
        elif isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def comparable(cfg) -> dict:
    """A config (DictConfig or dict) resolved, without the keys that may change when a run resumes."""
    from omegaconf import DictConfig, OmegaConf

    c = OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    gen = c.get("generation") or {}
    if all(v is None for v in (gen.get("vllm") or {}).values()):  # unset: as in runs made before the vllm backend
        gen.pop("vllm", None)
    return {k: v for k, v in c.items() if k not in RESUMABLE and k != "hydra"}


@dataclass
class State:
    """What a run directory says about its run."""

    status: str  # one of STATUSES
    step: int | None = None
    steps: int | None = None
    detail: str = ""


class RunDir:
    """One run's directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str | Path) -> Path:
        return self.path / name

    # --- reading ----------------------------------------------------------------------------------------------------

    def read_summary(self) -> dict | None:
        """summary.json, None when absent; ValueError (one line) when it cannot be read."""
        path = self.file(SUMMARY)
        if not path.exists():
            return None
        try:
            summary = read_json(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable {SUMMARY}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if not isinstance(summary, dict):
            raise ValueError(f"unreadable {SUMMARY}: not a JSON object")
        return summary

    def read_config(self) -> dict | None:
        """The stored config (interpolations unresolved), None when absent; ValueError when unreadable."""
        import yaml

        path = self.file(CONFIG)
        if not path.is_file():
            return None
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"unreadable {CONFIG}: {type(e).__name__}") from None
        if not isinstance(config, dict):
            raise ValueError(f"unreadable {CONFIG}: not a mapping")
        return config

    def read_overrides(self) -> list[str] | None:
        import yaml

        try:
            return [str(o) for o in yaml.safe_load(self.file(OVERRIDES).read_text()) or []]
        except (OSError, yaml.YAMLError):
            return None

    def read_metrics(self) -> tuple[list[dict], int]:
        """(records with a numeric step, unreadable lines)."""
        records, bad = read_jsonl(self.file(METRICS))
        good = [r for r in records if isinstance(r.get("step"), (int, float))]
        return good, bad + len(records) - len(good)

    def last_train_step(self, tail_bytes: int = 65536) -> int | None:
        """The step of the last training record (read from the end of metrics.jsonl, which grows with the run)."""
        try:
            with self.file(METRICS).open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - tail_bytes))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("kind") == "train":
                return int(rec["step"])
        return None

    def heartbeat_age(self, now: float | None = None) -> float | None:
        try:
            return (time.time() if now is None else now) - self.file(HEARTBEAT).stat().st_mtime
        except OSError:
            return None

    def state(self, now: float | None = None) -> State:
        """pending (no summary yet), running, stale (says running but its heartbeat stopped: the process died),
        completed, diverged, failed, unreadable (summary.json cannot be read), unknown (an unexpected status)."""
        try:
            summary = self.read_summary()
        except ValueError as e:
            return State("unreadable", self.last_train_step(), detail=str(e))
        if summary is None:
            return State("pending")
        status, steps = summary.get("status"), summary.get("steps")
        step = summary.get("step") if status in FINAL else self.last_train_step() or summary.get("step")
        if status == "running":
            age = self.heartbeat_age(now)
            if age is None or age > STALE_S:
                why = "never started" if age is None else f"{age:.0f} s"
                return State("stale", step, steps, f"no heartbeat for {why}")
            return State("running", step, steps)
        if status == "failed":
            return State("failed", step, steps, str(summary.get("error", "")))
        if status in FINAL:
            return State(status, step, steps)
        return State("unknown", step, steps, f"{SUMMARY}: unexpected status {status!r}")

    def drift(self, cfg) -> list[str]:
        """How `cfg` differs from the stored config, keys that may change on resume aside ([] when none is stored)."""
        stored = self.read_config()
        return [] if stored is None else config_diff(comparable(stored), comparable(cfg))

    def finished(self, steps: int | None = None) -> str | None:
        """The final status (completed / diverged) if the run finished (for `steps` steps, when given)."""
        try:
            summary = self.read_summary() or {}
        except ValueError:
            return None
        done = summary.get("status") in FINAL and (steps is None or summary.get("steps") == steps)
        return summary["status"] if done else None

    # --- writing (the trainer, and `klrl eval`) ------------------------------------------------------------------

    def write_summary(self, summary: dict) -> None:
        write_json(self.file(SUMMARY), summary)

    def write_config(self, config_yaml: str, overrides: list[str], hydra_yaml: str | None = None) -> None:
        import yaml

        atomic_write(self.file(CONFIG), lambda f: f.write(config_yaml))
        atomic_write(self.file(OVERRIDES), lambda f: f.write(yaml.safe_dump(list(overrides))))
        if hydra_yaml is not None:
            atomic_write(self.file(HYDRA), lambda f: f.write(hydra_yaml))

    def touch_heartbeat(self) -> None:
        self.file(HEARTBEAT).touch()

    def check_checkpoint(self, cfg) -> None:
        """Refuse a checkpoint whose config differs from `cfg` (keys that may change on resume aside)."""
        diff = self.drift(cfg)
        if diff:
            raise ConfigError(f"{self.path} holds a run with another configuration ({'; '.join(diff[:5])}); resume it "
                              "with its own settings, or choose another hydra.run.dir")

    def restart_metrics(self, start_step: int) -> None:
        """Keep only records up to `start_step` (a resumed run produces the later ones again, identically)."""
        records, _ = self.read_metrics()
        kept = [r for r in records if r["step"] <= start_step] if start_step else []
        atomic_write(self.file(METRICS), lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, records: list[dict]) -> None:
        """One write() of whole lines on an O_APPEND descriptor: a kill never leaves half a record in the middle."""
        if not records:
            return
        fd = os.open(self.file(METRICS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(json.dumps(r) + "\n" for r in records).encode())
        finally:
            os.close(fd)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every readable record of a run's metrics.jsonl (shorthand for RunDir(run_dir).read_metrics()[0])."""
    return RunDir(run_dir).read_metrics()[0]
