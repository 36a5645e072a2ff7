"""`klrl status SWEEP_DIR`: the state of every run of a sweep, from its run directories and from the scheduler.

Sources, joined per run directory (relative to the sweep dir):
  - SWEEP_DIR/submissions.jsonl, written by klrl's launchers at each submission: the runs, their overrides and
    steps, the job id of each (SLURM array task `12_3`, or a local process id);
  - every run directory found on disk (`.hydra/overrides.yaml`), so sweeps launched by other launchers show too;
  - summary.json (status, step at the last checkpoint, error) and the tail of metrics.jsonl (the live step);
  - squeue (jobs slurmctld still holds, finished ones included) and sacct (older ones) for the recorded job ids.

The run's own summary wins when it is final (completed, diverged); otherwise a job the scheduler still holds makes
the run pending or running (so a resubmitted failed run shows as pending), and a job that ended without the run
finishing makes it failed, with the scheduler's state and the job log's last line as detail.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from klrl.runs.rundir import CONFIG, FINAL, STATUSES, RunDir, State, read_jsonl

SUBMISSIONS = "submissions.jsonl"
# SLURM job states in which the job still exists and may (again) run.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}



@dataclass
class RunState:
    run: str  # run directory relative to the sweep dir
    status: str
    step: int | None = None
    steps: int | None = None
    job_id: str | None = None
    scheduler: str | None = None  # SLURM state, or RUNNING/ENDED for a local process
    detail: str = ""
    overrides: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading runs
def read_submissions(sweep_dir: Path) -> list[dict]:
    return read_jsonl(Path(sweep_dir) / SUBMISSIONS)[0]


def append_submission(sweep_dir: Path, record: dict) -> None:
    with (Path(sweep_dir) / SUBMISSIONS).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _disk_runs(sweep_dir: Path) -> dict[str, list[str]]:
    out = {}
    for p in sorted(sweep_dir.rglob(str(CONFIG))):
        if ".submitit" in p.parts:
            continue
        run = RunDir(p.parent.parent)
        out[str(run.path.relative_to(sweep_dir))] = run.read_overrides() or []
    return out


# ------------------------------------------------------------------------------------------------ scheduler
def expand_job_ids(job_id: str) -> list[str]:
    """`12_[3-5,7%2]` (how squeue/sacct print pending array tasks) -> 12_3 12_4 12_5 12_7."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1, int(step or 1))]
    return out


def _query(cmd: list[str]) -> list[tuple[str, str]] | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode:
        return None
    rows = []
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            state = parts[1].split()[0].upper() if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0"
            rows += [(jid, state) for jid in expand_job_ids(parts[0])]
    return rows


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id -> SLURM state for the given jobs (array tasks `A_i`); None when neither squeue nor sacct answers."""
    if not job_ids:
        return {}
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}, key=lambda s: (len(s), s)))
    acct = _query(["sacct", "-n", "-X", "-P", "-j", arrays, "-o", "JobID,State"])
    queue = _query(["squeue", "-h", "-r", "--states=all", "-j", arrays, "-o", "%i|%T"])
    if acct is None and queue is None:
        return None
    states = dict(acct or [])
    states.update(queue or [])  # slurmctld is ahead of the accounting database, which hears of changes later
    return states


def local_states(job_ids: list[str]) -> dict[str, str]:
    return {j: "RUNNING" if Path(f"/proc/{j.split('_')[0]}").exists() else "ENDED" for j in job_ids}


def scheduler_states(records: dict[str, dict]) -> tuple[dict[str, str], bool]:
    """-> (job id -> state, whether the scheduler could be asked about every recorded job)."""
    slurm = [r["job_id"] for r in records.values() if r.get("executor") == "slurm" and r.get("job_id")]
    here = socket.gethostname()
    local = [r["job_id"] for r in records.values()
             if r.get("executor") == "local" and r.get("job_id") and r.get("host") == here]
    states, complete = {}, True
    if slurm:
        found = slurm_states(slurm)
        complete = found is not None
        states.update(found or {})
    states.update(local_states(local))
    if any(r.get("executor") == "local" and r.get("host") != here for r in records.values()):
        complete = False
    return states, complete


# ------------------------------------------------------------------------------------------------ deriving
def job_error(record: dict | None) -> str:
    """Why a run's job failed, from its submitit files: the error a sweep job returned (the Hydra app raises in
    a sweep; Hydra turns that into a failed JobReturn and the job itself ends COMPLETED), the last line of a
    traceback submitit caught, or the last `klrl:` line of the job's stderr."""
    if not record or not record.get("folder") or not record.get("job_id"):
        return ""
    job_id = record["job_id"]
    folder = Path(record["folder"].replace("%j", job_id))
    result = folder / f"{job_id}_0_result.pkl"
    if result.exists():
        try:
            import pickle

            from hydra.core.utils import JobStatus

            with result.open("rb") as f:
                outcome, value = pickle.load(f)
            if outcome == "error":
                lines = [ln for ln in str(value).strip().splitlines() if ln.strip()]
                return lines[-1].strip()[:300] if lines else "error"
            if getattr(value, "status", None) == JobStatus.FAILED:
                err = getattr(value, "_return_value", None)
                return f"{err}"[:300] if isinstance(err, BaseException) else "failed"
        except Exception:  # unreadable or from another version: fall back on the log
            pass
    err = folder / f"{job_id}_0_log.err"
    try:
        lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    klrl_lines = [ln for ln in lines if ln.startswith("klrl:")]
    return f"{klrl_lines[-1][:300]} ({err})" if klrl_lines else f"see {err}"


def derive(state: State, sched: str | None, record: dict | None) -> tuple[str, str]:
    """-> (status, detail) for one run, from what its directory says and what the scheduler says: the run's own
    final word wins; a job the scheduler still holds makes it pending or running; a job that ended without the run
    finishing makes it failed."""
    st = state.status
    if st in FINAL:
        return st, ""
    if sched in ACTIVE:
        if sched in WAITING:
            # A run directory not yet written (unknown) is a task still waiting for its first start, not a requeue.
            return "pending", "requeued" if st not in ("pending", "unknown") else ""
        return "running", ""
    if st == "failed":
        return st, state.detail
    if sched is None:  # nothing but the run directory to go by
        if st in ("stale", "unreadable"):
            return st, state.detail
        if st == "running":
            return "running", "no scheduler record" if record and record.get("job_id") else ""
        if st == "pending" and not (record and record.get("job_id")):
            return "pending", "no summary yet"
        return "unknown", state.detail or "no summary and no scheduler record"
    why = job_error(record)
    return "failed", f"job ended ({sched}) without finishing the run" + (f": {why}" if why else "")


def collect(sweep_dir: Path, sched: dict[str, str] | None = None, only: list[str] | None = None) -> list[RunState]:
    """Every run of the sweep (or those named in `only`), in submission order, then the ones only found on disk.

    `sched` gives the scheduler states to use (job id -> state) instead of asking squeue/sacct.
    """
    sweep_dir = Path(sweep_dir)
    records: dict[str, dict] = {}
    for sub in read_submissions(sweep_dir):
        for kind in ("runs", "skipped"):
            for r in sub.get(kind, []):
                prev = records.get(r["run"], {})
                if kind == "skipped":  # a skip is no new job: keep the one that ran it
                    records[r["run"]] = {**r, **{k: prev[k] for k in ("job_id", "executor", "folder", "host") if k in prev}}
                else:
                    records[r["run"]] = {**r, "executor": sub.get("executor"), "folder": sub.get("folder"),
                                         "host": sub.get("host")}
    disk = _disk_runs(sweep_dir) if sweep_dir.is_dir() else {}
    names = list(records) + [d for d in disk if d not in records]
    if only is not None:
        wanted = set(only)
        names = [n for n in names if n in wanted]
    if sched is None:
        sched, _ = scheduler_states({n: records[n] for n in names if n in records})
    out = []
    for name in names:
        rec = records.get(name)
        run = RunDir(sweep_dir / name)
        st = run.state() if run.path.is_dir() else State("unknown")
        job_id = rec.get("job_id") if rec else None
        state = sched.get(job_id) if job_id else None
        status, detail = derive(st, state, rec)
        step, steps = st.step, st.steps if st.steps is not None else (rec or {}).get("steps")
        out.append(RunState(run=name, status=status, step=step, steps=steps, job_id=job_id, scheduler=state,
                            detail=detail, overrides=(rec or {}).get("overrides") or disk.get(name, [])))
    return out


# ------------------------------------------------------------------------------------------------ output
def _labels(states: list[RunState]) -> tuple[list[str], list[str]]:
    """Each run's overrides that not all runs share (the common ones are printed once)."""
    def shown(o: str) -> bool:
        return o.split("=", 1)[0].lstrip("+~") != "resume"

    sets = [set(filter(shown, s.overrides)) for s in states]
    common = set.intersection(*sets) if len(sets) > 1 else set()
    labels = [" ".join(o for o in s.overrides if shown(o) and o not in common) or s.run for s in states]
    ordered_common = [o for o in (states[0].overrides if states else []) if o in common]
    return labels, ordered_common


def counts(states: list[RunState]) -> str:
    n = {s: sum(r.status == s for r in states) for s in STATUSES}
    return f"{len(states)} runs: " + ", ".join(f"{v} {k}" for k, v in n.items() if v)


def render(states: list[RunState], sweep_dir: Path | None = None) -> str:
    lines = []
    if sweep_dir is not None:
        lines.append(f"sweep dir: {sweep_dir}")
    if not states:
        return "\n".join(lines + ["no runs found"])
    labels, common = _labels(states)
    if common:
        lines.append(f"every run: {' '.join(common)}")
    rows = [("RUN", "STATUS", "STEP", "JOB", "SLURM", "DETAIL")]
    for label, s in zip(labels, states):
        step = "-" if s.step is None else f"{s.step}/{s.steps}" if s.steps is not None else str(s.step)
        rows.append((label, s.status, step, s.job_id or "-", s.scheduler or "-", s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else ""))
    lines.append(counts(states))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------ one run's report
SPLIT_NAMES = {"id": "ID", "ood": "OOD"}  # in-domain, out-of-domain


def _with_ci(ev: dict, key: str) -> str:
    if key not in ev:
        return "-"
    lo, hi = ev.get(f"{key}_lo"), ev.get(f"{key}_hi")
    return f"{ev[key]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _last(records: list[dict], key: str) -> float | None:
    """The value of `key` in the last training record that has it (the extras are not logged every step)."""
    return next((r[key] for r in reversed(records) if r.get("kind") == "train" and key in r), None)


def run_report(run: RunDir, wall_s: float | None) -> str:
    """What `klrl train` prints at the end: each evaluation split's pass@1 and greedy accuracy at the start and the
    end (95% bootstrap CIs over problems), the last exact KL and entropy, the status and the wall time (None: this
    command trained nothing, the run had already finished)."""
    import datetime

    import pandas as pd

    summary = run.read_summary() or {}
    start, end = summary.get("initial_eval") or {}, summary.get("final_eval") or summary.get("last_eval") or {}
    keys = sorted({k for k in (*start, *end) if not k.endswith(("_lo", "_hi"))},
                  key=lambda k: (k.split("/")[1:2], k.endswith("greedy")))  # by split, pass@1 before greedy
    rows = {" ".join(SPLIT_NAMES.get(p, p) for p in k.split("/")[1:]): (_with_ci(start, k), "→", _with_ci(end, k))
            for k in keys}
    train = [r for r in run.read_metrics()[0] if r.get("kind") == "train"]
    for key, label in (("kl/exact", "KL (exact)"), ("entropy", "entropy")):
        first, last = (_last(part, key) for part in (train[:1], train))
        rows[label] = tuple("-" if v is None else f"{v:.4g}" for v in (first, last))
        rows[label] = (rows[label][0], "→", rows[label][1])
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["start", "", "end"])
    when = "already, nothing to do" if wall_s is None else f"in {datetime.timedelta(seconds=round(wall_s))}"
    head = f"{summary.get('status', 'unknown')} at step {summary.get('step')}/{summary.get('steps')} {when}: {run.path}"
    note = ("ID / OOD: in-domain / out-of-domain split; pass@1 and greedy: mean accuracy over problems [95% bootstrap "
            "CI]; KL (per sequence) and entropy (per token): first and last step")
    return "\n".join([head, table.to_string(), note])
