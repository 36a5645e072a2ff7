"""klrl's submitit launchers (`hydra/launcher=slurm` / `local`): hydra-submitit-launcher's, plus sweep hygiene.

The stock `hydra/launcher=submitit_slurm` runs klrl sweeps as they are: a job requeued after preemption or a
time-out re-runs the same overrides, and `resume=auto` (the default) continues the run from its checkpoint.
What the stock launcher does not do, and this one does:
  - runs whose summary.json already says completed/diverged are not submitted again (`skip_finished`);
  - each submission is recorded in SWEEP_DIR/submissions.jsonl (runs, overrides, job ids) for `klrl status`;
  - `wait: false` submits and returns at once, printing the sweep dir and the job ids;
  - when waiting, it reports each run as it ends, then prints a table of every run's status and exits 1 if any run
    did not finish (with the stock launcher, Hydra raises the first failed run's error, with no per-run report).
Two grid points that would write to the same run directory are refused before anything is submitted.
"""

from __future__ import annotations

import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf, open_dict


def _drift(run_dir: Path, cfg: Any) -> List[str]:
    """How a finished run's stored config differs from the one about to be launched under its name. A run dir is
    named by overrides only, so an edited grid file or conf/ default would otherwise count as already done."""
    from klrl.runs.rundir import RunDir

    try:
        return RunDir(run_dir).drift(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except Exception:  # an interpolation that only resolves inside the job: nothing to compare
        return []


class _SweepHygiene:
    _EXECUTOR: str
    params: Dict[str, Any]
    poll_s: float = 15.0  # longest pause between two looks at the jobs while waiting

    def __init__(self, wait: bool = True, skip_finished: bool = True, **params: Any) -> None:
        super().__init__(**params)  # type: ignore[call-arg]
        self.wait = wait
        self.skip_finished = skip_finished

    # ------------------------------------------------------------ on the login node
    def _plan(self, overrides: List[str], num: int, sweep_dir: Path) -> Dict[str, Any]:
        from klrl.runs.rundir import RunDir

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)  # type: ignore[attr-defined]
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num  # as the job will see it, should hydra.sweep.subdir use it
        run = str(cfg.hydra.sweep.subdir)
        steps = int(cfg.steps) if "steps" in cfg else None
        finished = RunDir(sweep_dir / run).finished(steps)
        return {"run": run, "overrides": list(overrides), "steps": steps, "num": num, "status": finished,
                "drift": _drift(sweep_dir / run, cfg) if finished else []}

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=folder, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plan every run, refuse a shared run directory or a drifted finished run, submit the rest as one array,
        record the submission, then (unless wait=false) wait and print every run's status."""
        assert self.config is not None  # type: ignore[attr-defined]
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()  # type: ignore[attr-defined]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        plans = [self._plan(list(ov), initial_job_idx + i, sweep_dir) for i, ov in enumerate(job_overrides)]
        self._refuse(plans)
        todo = [p for p in plans if not (self.skip_finished and p["status"])]
        skipped = [p for p in plans if p not in todo]
        print(f"sweep dir: {sweep_dir}")
        if skipped:
            print(f"{len(skipped)} of {len(plans)} runs already finished; not submitted again")
        if not todo:
            from klrl.runs.status import collect, render

            print("nothing to submit")
            print(render(collect(sweep_dir, sched={}, only=[p["run"] for p in plans])))
            return [self._job_return(p, p["status"], sweep_dir) for p in plans]
        jobs = self._submit(todo, skipped, sweep_dir)
        if not self.wait:
            return [self._job_return(p, "submitted" if p in todo else p["status"], sweep_dir) for p in plans]
        return self._report(plans, self._wait(jobs, todo, sweep_dir), sweep_dir)

    def _refuse(self, plans: List[Dict[str, Any]]) -> None:
        seen: Dict[str, Dict[str, Any]] = {}
        for p in plans:
            if p["run"] in seen:
                print(f"klrl: runs [{' '.join(seen[p['run']]['overrides'])}] and [{' '.join(p['overrides'])}] would "
                      f"share the run directory {p['run']!r}; nothing was submitted", file=sys.stderr)
                sys.exit(2)
            seen[p["run"]] = p
        drifted = [p for p in plans if p["drift"]]
        if drifted and self.skip_finished:
            for p in drifted:
                print(f"klrl: {p['run']} finished with another configuration ({'; '.join(p['drift'][:5])}); "
                      "choose another hydra.sweep.dir, or move that run away", file=sys.stderr)
            print("klrl: nothing was submitted", file=sys.stderr)
            sys.exit(2)

    def _submit(self, todo: List[Dict[str, Any]], skipped: List[Dict[str, Any]], sweep_dir: Path) -> List[Any]:
        from klrl.runs.status import append_submission

        folder = str(Path(self.params["submitit_folder"]).absolute())
        try:
            jobs = self._executor().map_array(self, *zip(*[
                (p["overrides"], "hydra.sweep.dir", p["num"], f"job_id_for_{p['num']}", Singleton.get_state())
                for p in todo]))
        except Exception as e:  # sbatch's refusal (unknown partition, account, ...) is the message that matters
            print(f"klrl: submitting {len(todo)} runs to {self._EXECUTOR} failed: {str(e).strip()}", file=sys.stderr)
            sys.exit(1)
        for p, job in zip(todo, jobs):
            p["job_id"] = str(job.job_id)
        append_submission(sweep_dir, {
            "submitted_at": datetime.now().isoformat(timespec="seconds"), "executor": self._EXECUTOR,
            "host": socket.gethostname(), "folder": folder, "argv": sys.argv,
            "runs": [{k: p[k] for k in ("run", "overrides", "steps", "num", "job_id")} for p in todo],
            "skipped": [{k: p[k] for k in ("run", "overrides", "steps", "num", "status")} for p in skipped],
        })
        ids = [p["job_id"] for p in todo]
        arrays = sorted({i.split("_")[0] for i in ids})
        what = f"job array {', '.join(arrays)}" if self._EXECUTOR == "slurm" and "_" in ids[0] else "jobs"
        print(f"submitted {len(todo)} runs to {self._EXECUTOR} as {what}: {' '.join(ids)}")
        print(f"submitit logs: {folder}")
        print(f"watch: klrl status {sweep_dir}", flush=True)
        return jobs

    def _report(self, plans: List[Dict[str, Any]], sched: Dict[str, str], sweep_dir: Path) -> List[JobReturn]:
        from klrl.runs.rundir import FINAL
        from klrl.runs.status import collect, render

        states = collect(sweep_dir, sched=sched, only=[p["run"] for p in plans])
        print(render(states, sweep_dir), flush=True)
        unfinished = [s for s in states if s.status not in FINAL]
        if unfinished:
            print(f"klrl: {len(unfinished)} of {len(states)} runs did not finish: "
                  + ", ".join(f"{s.run} ({s.status})" for s in unfinished), file=sys.stderr)
            sys.exit(1)
        return [self._job_return(p, next(s.status for s in states if s.run == p["run"]), sweep_dir) for p in plans]

    def _wait(self, jobs: List[Any], todo: List[Dict[str, Any]], sweep_dir: Path) -> Dict[str, str]:
        """Wait for every job, reporting each as it ends; -> job id -> final scheduler state.

        A job that dies without a result file (killed, out of memory, a crash outside Python) is seen only through
        sacct, which submitit's watcher asks at most every 10 minutes about a job that is 20 minutes old; here sacct
        is asked once per poll (at most every poll_s) for all the arrays."""
        from klrl.runs.rundir import RunDir
        from klrl.runs.status import ACTIVE, derive

        folder = str(Path(self.params["submitit_folder"]).absolute())
        def final_state(job: Any) -> str:
            state = str(job.state).split()[0].upper()
            # done() may see the result file before the accounting database hears of the end.
            return "ENDED" if state in ACTIVE or state == "UNKNOWN" else state

        pending = {str(j.job_id): (j, p) for j, p in zip(jobs, todo)}
        delay, k = 1.0, 0
        try:
            while pending:
                if self._EXECUTOR == "slurm":
                    jobs[0].watcher.update()  # one sacct call for every registered array
                for job_id, (job, p) in list(pending.items()):
                    if not job.done():
                        continue
                    del pending[job_id]
                    k += 1
                    status, why = derive(RunDir(sweep_dir / p["run"]).state(), final_state(job),
                                         {"job_id": job_id, "folder": folder})
                    print(f"[{k}/{len(jobs)}] {job_id} {p['run']}: {status}{f' ({why})' if why else ''}", flush=True)
                if pending:
                    time.sleep(delay)
                    delay = min(delay * 1.5, self.poll_s)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs go on. Watch them with: klrl status {sweep_dir}", file=sys.stderr)
            sys.exit(130)
        return {str(job.job_id): final_state(job) for job in jobs}

    @staticmethod
    def _job_return(plan: Dict[str, Any], value: Any, sweep_dir: Path) -> JobReturn:
        ret = JobReturn(overrides=plan["overrides"], working_dir=str(sweep_dir / plan["run"]))
        ret.status = JobStatus.COMPLETED
        ret.return_value = value
        return ret


class KlrlSlurmLauncher(_SweepHygiene, SlurmLauncher):
    pass


class KlrlLocalLauncher(_SweepHygiene, LocalLauncher):
    pass
