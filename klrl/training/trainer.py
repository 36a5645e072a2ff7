"""The one trainer core: every estimator x placement x model x algo runs through `train`.

    check the run directory (read only) -> lock it -> build -> restore the last good checkpoint
    for each step: batch (from the batch source) -> update -> log -> evaluate -> checkpoint
    finish: completed, or diverged (a collapse is a result), or interrupted (SIGUSR2: checkpointed for requeue)

Every random draw of a step is seeded from (seed, step), so a resumed run replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import DictConfig

from klrl.config.specs import kl_spec, pg_spec
from klrl.config.validate import validate
from klrl.runs.rundir import RunDir
from klrl.sampling.batch import step_seed
from klrl.sampling.generation import make_generator
from klrl.training.distributed import gathered
from klrl.training.evaluate import evaluate
from klrl.training.loggers import make_loggers
from klrl.training.run import Heartbeat, MarkFailed, Preemption, check_run, finish, lock_run, rank, start_summary
from klrl.training.setup import Parts, build, make_source, restore, save
from klrl.training.update import Diverged, update

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path | str) -> str:
    """Train one configuration in run_dir. Returns completed, diverged, or interrupted (SIGUSR2: requeue)."""
    validate(cfg)
    run = RunDir(run_dir)
    done = check_run(cfg, run)  # read-only: nothing is written to a run directory that is refused
    if done:
        return done
    with ExitStack() as stack:
        stack.enter_context(lock_run(run))
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        main = rank() == 0
        summary = start_summary(cfg, run, main)
        stack.enter_context(MarkFailed(run, summary, main))
        stack.enter_context(Heartbeat(run, main))
        p = build(cfg)
        start = summary["step"] = restore(cfg, run, p)
        if start == 0:  # a fresh start evaluates and logs afresh, whatever an earlier attempt recorded
            summary.pop("initial_eval", None)
            summary.pop("logger_ids", None)
        signalled = stack.enter_context(Preemption())
        generator = make_generator(cfg, p.model, p.tokenizer)
        stack.callback(generator.close)
        source = make_source(cfg, p, generator, start)
        stack.callback(source.close)
        logs = stack.enter_context(make_loggers(cfg, run, start, main, summary))  # closed with the run's status
        kl, pg = kl_spec(cfg), pg_spec(cfg)
        warn_grpo_reward_kl(kl, pg, main)
        splits = p.task.eval_splits()

        def run_eval(step: int) -> dict:
            t0 = time.perf_counter()
            ev = evaluate_at(cfg, p, generator, splits, step)
            if ev:
                logs.write({"step": step, "kind": "eval", **ev, "time/eval": time.perf_counter() - t0})
            return ev

        summary["initial_eval"] = summary.get("initial_eval") or (run_eval(0) if start == 0 and cfg.eval.at_start
                                                                   else {})
        last_eval = summary["initial_eval"] if start == 0 else {}
        for step in range(start, cfg.steps):
            try:
                batch = source.get(step)
                rec = update(batch, cfg, p.model, p.ref, p.optimizer, p.scheduler, kl, pg, p.dist,
                             extras=step % cfg.extras_every == 0)
            except Diverged as e:
                logs.write({"step": step + 1, "kind": "diverged", "reason": str(e)})
                return finish(run, summary, "diverged", step, main, diverged_at=step + 1, reason=str(e),
                              last_eval=last_eval)
            logs.write({"step": step + 1, "kind": "train", **rec, **batch.stats, **source.publish(step, p.model)})
            done = step + 1
            if done == cfg.steps or (cfg.eval.every and done % cfg.eval.every == 0):
                last_eval = run_eval(done)
            stop = signalled.agreed(p.dist) and done < cfg.steps  # collective: every rank stops at the same step
            if done == cfg.steps or done % cfg.ckpt_every == 0 or stop:
                checkpoint(cfg, run, p, logs, summary, done)
            if stop:
                log.warning("SIGUSR2 at step %d: checkpointed, handing over for requeue", done)
                signalled.hand_over()
                return "interrupted"
        return finish(run, summary, "completed", cfg.steps, main, final_eval=last_eval)


def warn_grpo_reward_kl(kl, pg, main: bool) -> None:
    if kl.in_reward and pg.baseline == "grpo" and main:
        log.warning("algo.baseline=grpo with the KL in the reward: the group std rescales the penalty, so its "
                    "strength depends on the task reward's spread, not only on beta (`klrl audit algo=grpo`)")


def checkpoint(cfg, run: RunDir, p: Parts, logs, summary: dict, step: int) -> None:
    logs.flush()  # every record up to the checkpoint is on disk before it
    save(cfg, run, p, step)
    summary["step"] = step
    if p.dist.main:
        run.write_summary(summary)


def evaluate_at(cfg, p: Parts, generator, splits, step: int) -> dict:
    """pass@1 and greedy on every split, rank 0 alone on gathered weights (the others wait in the collective)."""
    with gathered(p.model):
        if not p.dist.main:
            return {}
        if p.ring is not None:
            generator.sync(p.model)  # it holds a lagged snapshot; evaluations are of the current weights
        return evaluate(p.model, p.tokenizer, p.task, splits, cfg, seed=step_seed(cfg.seed, 10**9 + step),
                        generator=generator)
