"""The one trainer core: every estimator x placement x model runs through `train`.

Each step: sample prompts, generate G responses per prompt with the current policy, score them, then one forward
pass per micro-batch for the policy (with grad) and the frozen reference (no grad), `policy_loss`, backward,
clip, AdamW step. Every random draw of a step is seeded from (seed, step), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from klrl.config.schema import ConfigError, kl_spec, pg_spec, validate
from klrl.training.distributed import Dist, gathered, load_state_dicts, local_device, setup, shard, state_dicts
from klrl.core.estimators import sequence_estimates
from klrl.training.evaluate import eval_sampling, evaluate
from klrl.sampling.generation import Generator, logprob_mismatch, make_generator
from klrl.training.lag import SnapshotRing
from klrl.core.losses import policy_loss
from klrl.models.registry import DTYPES, load_model
from klrl.core.distributions import token_logprobs
from klrl.sampling.rollout import (
    Rollout,
    decode_responses,
    encode_prompts,
    kl_and_entropy,
    policy_logprobs,
    sampler_logits,
    support_of,
)
from klrl.runs.rundir import (
    CHECKPOINT,
    SUMMARY,
    MetricsLog,
    load_checkpoint,
    load_ring_shard,
    read_json,
    save_checkpoint,
    save_ring_shard,
    set_rng_state,
    write_json,
)
from klrl.tasks import TASKS

log = logging.getLogger(__name__)
# Keys that may change between an interrupted run and its resumption without changing what it computes.
RESUMABLE_KEYS = {"resume", "steps", "progress", "tensorboard", "ckpt_every", "device", "cache_dir"}


class Diverged(Exception):
    pass


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def comparable(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    gen = c.get("generation") or {}
    if all(v is None for v in (gen.get("vllm") or {}).values()):  # unset: as in runs made before the vllm backend
        gen.pop("vllm", None)
    return {k: v for k, v in c.items() if k not in RESUMABLE_KEYS}


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


@dataclass
class Batch:
    """What one step trains on: responses, their rewards, and the log-probs of the policy that sampled them."""

    rollout: Rollout
    rewards: Tensor  # [B]
    gen_time: float
    old_logp: Tensor | None = None  # [B, R] behaviour log-probs; None = on-policy (the live policy's, detached)
    staleness: int = 0  # trainer steps (batches) between the sampling policy and the policy being updated
    stats: dict = field(default_factory=dict)  # extra metrics of the step (the sampler's log-prob mismatch)


def collect(step: int, cfg, generator: Generator, tokenizer, task, dist: Dist = Dist()) -> Batch:
    """Sample this rank's share of the step's prompts, G responses each, with `generator`, and score them."""
    t0 = time.perf_counter()
    G = cfg.algo.group_size
    prompts = task.sample_train(random.Random(step_seed(cfg.seed, step)), cfg.algo.prompts_per_step)
    problems = [p for p in dist.shard(prompts) for _ in range(G)]
    torch.manual_seed(step_seed(cfg.seed, step) + 7919 * dist.rank)
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems], cfg.model.chat_template)
    ro = generator.generate(prompt_ids, cfg.task.max_new_tokens, cfg.generation.temperature, cfg.generation.top_p)
    rewards = torch.tensor([task.score(p, t) for p, t in zip(problems, decode_responses(tokenizer, ro))])
    return Batch(ro, rewards, time.perf_counter() - t0)


@torch.no_grad()
def behaviour_logprobs(policy, batch: Batch, micro: int, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """log-probs of the sampled tokens under the sampling distribution of the policy that generated them
    (recomputed by a forward pass), [B, R]."""
    out = []
    for i in range(0, len(batch.rewards), micro):
        out.append(policy_logprobs(policy, batch.rollout.select(slice(i, i + micro)), temperature, top_p))
    return torch.cat(out)


def update(batch: Batch, cfg, model, ref, optimizer, scheduler, kl, pg, dist: Dist = Dist()) -> dict:
    """U optimizer updates on one batch. Returns the step's metrics (averaged over ranks); raises Diverged."""
    t0 = time.perf_counter()
    G, U = cfg.algo.group_size, cfg.algo.updates_per_batch
    ro, rewards = batch.rollout, batch.rewards
    model.train()
    device = next(model.parameters()).device
    B = len(rewards)
    mb = cfg.algo.micro_batch_size or B
    chunks = [slice(i, min(i + mb, B)) for i in range(0, B, mb)]
    n_tok_local = ro.response_mask.sum().item()
    n_tok = dist.sum(n_tok_local)
    token_norm = n_tok / (B * dist.world)
    T, top_p = cfg.generation.temperature, cfg.generation.top_p
    old = batch.old_logp
    if old is None and U > 1:  # later updates are off-policy: keep the sampling policy's log-probs
        old = behaviour_logprobs(model, batch, mb, T, top_p)
    ref_lp: list = [None] * len(chunks)
    logged: dict = defaultdict(float)
    grad_norms = []
    ent_sum = 0.0
    bad = ""  # checked collectively after the micro-batches, so that every rank stops at the same step
    for u in range(U):
        optimizer.zero_grad(set_to_none=True)
        for j, c in enumerate(chunks):
            part = ro.select(c)
            w = (c.stop - c.start) / B
            mask = part.response_mask.to(device)
            logits = sampler_logits(model, part, T, top_p)
            logp = token_logprobs(logits, part.responses, mask)
            if not torch.isfinite(logp).all():
                bad = bad or "non-finite log-probs"
            if u == 0:
                with torch.no_grad():
                    ref_logits = sampler_logits(ref, part, T, top_p, support=support_of(logits, top_p))
                    ref_lp[j] = token_logprobs(ref_logits, part.responses, mask)
                    exact_kl, ent = kl_and_entropy(logits.detach(), ref_logits, mask)
                    del ref_logits
                    logged["kl/exact"] += exact_kl.mean().item() * w
                    ent_sum += ent.sum().item()
                    for name, v in sequence_estimates(logp, ref_lp[j], mask).items():
                        logged[f"kl/{name}"] += v.mean().item() * w
            old_j = old[c].to(device) if old is not None else logp.detach()
            out = policy_loss(logp, old_j, ref_lp[j], mask, rewards[c].to(device), G, pg, kl, token_norm=token_norm)
            if not torch.isfinite(out.loss):
                bad = bad or "non-finite loss"
            (out.loss * w).backward()
            if u == 0:
                logged["loss"] += out.loss.item() * w
                for k, v in out.stats.items():
                    logged[k] += v.item() * w
        if dist.sum(float(bool(bad))) > 0:
            raise Diverged(bad or "non-finite values on another rank")
        dist.average_gradients(model)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # a DTensor under FSDP
        if not torch.isfinite(gn):
            raise Diverged("non-finite gradient norm")
        grad_norms.append(gn.item())
        optimizer.step()
        scheduler.step()
    t_train = time.perf_counter() - t0
    local = {
        "reward": rewards.mean().item(),
        "accuracy": (rewards >= 1).float().mean().item(),
        "response_length": n_tok_local / B,
        **dict(logged),
    }
    return {
        **dist.mean_dict(local),
        "entropy": dist.sum(ent_sum) / max(n_tok, 1),  # per token, over the global batch
        "grad_norm": grad_norms[0],
        "lr": scheduler.get_last_lr()[0],
        "staleness": batch.staleness,
        "time/step": t_train + batch.gen_time,
        "time/generate": batch.gen_time,
        "tokens_per_s/generate": n_tok / max(batch.gen_time, 1e-9),
        "tokens_per_s/train": n_tok * U / max(t_train, 1e-9),
    }


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to silently overwrite or extend an existing run."""
    if (run_dir / CHECKPOINT).exists() and not cfg.resume:
        raise ConfigError(f"{run_dir} already holds a checkpoint; pass resume=true to continue it, or pick another hydra.run.dir")


class NullLog:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: DictConfig, run_dir: Path) -> str:
    """Train one configuration in run_dir. Returns the status: completed, diverged, or interrupted (SIGUSR2)."""
    validate(cfg)
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir)
    summary_path = run_dir / SUMMARY
    if cfg.resume and summary_path.exists():
        prev = read_json(summary_path)
        diff = config_diff(prev.get("config", {}), comparable(cfg)) if "config" in prev else []
        if diff:
            raise ConfigError(f"resume: config differs from the finished run's ({'; '.join(diff)})")
        if prev.get("status") in ("completed", "diverged") and prev.get("steps") == cfg.steps:
            log.info("%s: already %s at step %s, nothing to do", run_dir, prev["status"], prev.get("step"))
            return prev["status"]

    device = local_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.model.get("cpu_threads"):
        torch.set_num_threads(cfg.model.cpu_threads)
    dist = setup(device, cfg.model.fsdp)
    if cfg.algo.prompts_per_step % dist.world:
        raise ConfigError(f"algo.prompts_per_step={cfg.algo.prompts_per_step} must be divisible by the {dist.world} ranks")
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tokenizer = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    model.to(device)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    lagged = cfg.async_level > 0 and cfg.async_mode == "sim"
    behaviour = copy.deepcopy(ref) if lagged else None  # the lag ring's sampler; copied before FSDP, which can't be
    if cfg.model.fsdp:  # the optimizer must be built on the sharded parameters
        compute = DTYPES[cfg.model.dtype]
        shard(model, device, compute)
        for frozen in (ref, behaviour):  # no master copy needed: held in the compute dtype
            if frozen is not None:
                shard(frozen.to(compute), device, compute)
    elif cfg.model.dtype in ("bfloat16", "float16") and dist.main:
        log.warning("training in pure %s: AdamW updates smaller than ~0.4%% of a weight are rounded away; "
                    "model.fsdp=true model.param_dtype=float32 keeps float32 master weights", cfg.model.dtype)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    warmup = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ring = SnapshotRing(behaviour, cfg.async_level) if lagged else None
    if cfg.async_mode == "pipeline" and dist.world > 1:
        raise ConfigError("async_mode=pipeline runs with a single trainer process; use async_mode=sim with several ranks")

    start = 0
    ckpt = load_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        diff = config_diff(ckpt["config"], comparable(cfg))
        if diff:
            raise ConfigError(f"resume: config differs from the checkpoint's ({'; '.join(diff)})")
        load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        if ring is not None:  # under FSDP each rank saved its own shard of every snapshot
            ring.load_state(load_ring_shard(run_dir, ckpt["step"], dist.rank, dist.world, ckpt["ring_shards"])
                            if dist.sharded else ckpt["ring"])
        start = ckpt["step"]
        log.info("resumed from step %d", start)

    kl, pg = kl_spec(cfg), pg_spec(cfg)
    if kl.in_reward and pg.baseline == "grpo" and dist.main:
        log.warning("algo.baseline=grpo with the KL in the reward: the group std rescales the penalty, so its strength "
                    "depends on the task reward's spread, not only on beta (README: `klrl audit algo=grpo`)")
    splits = task.eval_splits()
    metrics = MetricsLog(run_dir, start, cfg.steps, cfg.tensorboard, cfg.progress) if dist.main else NullLog()
    summary = {"status": "running", "step": start, "steps": cfg.steps, "run_dir": str(run_dir), "config": comparable(cfg),
               "eval_sampling": eval_sampling(cfg)}

    def write_summary() -> None:
        if dist.main:
            summary["updated_at"] = time.time()  # a heartbeat: a "running" run that stops updating was killed
            write_json(summary_path, summary)

    def run_eval(step: int) -> dict:
        with gathered(model):  # collective on entry; then rank 0 evaluates alone
            if not dist.main:
                return {}
            if ring is not None:
                generator.sync(model)  # it holds a lagged snapshot; evaluations are of the current weights
            ev = evaluate(model, tokenizer, task, splits, cfg, seed=step_seed(cfg.seed, 10**9 + step),
                          generator=generator)
        metrics.write({"step": step, "kind": "eval", **ev})
        return ev

    def save(step: int) -> None:
        model_state, optim_state = state_dicts(model, optimizer)  # collective under FSDP
        extra = {"config": comparable(cfg)}
        if ring is not None and dist.sharded:
            save_ring_shard(run_dir, step, dist.rank, dist.world, ring.state())
            dist.barrier()  # every shard is on disk before the checkpoint that refers to them
            extra["ring_shards"] = dist.world
        elif ring is not None:
            extra["ring"] = ring.state()
        if dist.main:
            save_checkpoint(run_dir, step, model_state, optim_state, scheduler, extra)

    pipeline = None
    generator = None

    def next_batch(step: int) -> Batch:
        if pipeline is not None:
            return pipeline.get(step)
        if ring is None:
            batch = collect(step, cfg, generator, tokenizer, task, dist)
        else:
            ring.push(model)
            behaviour, staleness = ring.policy()
            generator.sync(behaviour)
            batch = collect(step, cfg, generator, tokenizer, task, dist)
            batch.old_logp = behaviour_logprobs(behaviour, batch, cfg.algo.micro_batch_size or len(batch.rewards),
                                                cfg.generation.temperature, cfg.generation.top_p)
            batch.staleness = staleness
        ro = batch.rollout
        if ro.sampler_logp is not None:  # the engine's own log-probs: compare with ours for the same weights
            if batch.old_logp is not None:  # already computed, for the whole batch
                ours, part = batch.old_logp, ro
            else:  # one prompt group: a forward pass over G sequences, a small share of the step
                part = ro.select(slice(0, cfg.algo.group_size))
                with torch.no_grad():
                    ours = policy_logprobs(model, part, cfg.generation.temperature, cfg.generation.top_p)
            batch.stats = dist.mean_dict(logprob_mismatch(part.sampler_logp, ours, part.response_mask))
        return batch

    # SIGUSR2 is SLURM's "you are about to be preempted / time out" (submitit requeues on it). Finish the step,
    # checkpoint, then hand over to whoever handled the signal before (submitit: requeue with resume=true).
    signalled: list = []
    hooked = threading.current_thread() is threading.main_thread()
    prev_handler = signal.signal(signal.SIGUSR2, lambda signum, frame: signalled.append((signum, frame))) if hooked else None

    write_summary()
    try:
        if cfg.async_mode == "pipeline":  # inside the try: an error or Ctrl-C from here on closes the generator
            from klrl.training.pipeline import Pipeline

            pipeline = Pipeline(cfg, model, start_step=start)
        generator = make_generator(cfg, model, tokenizer)
        last_eval = run_eval(0) if start == 0 and cfg.eval.at_start else {}
        if start == 0 and last_eval:
            summary["initial_eval"] = last_eval
        for step in range(start, cfg.steps):
            try:
                batch = next_batch(step)
                rec = update(batch, cfg, model, ref, optimizer, scheduler, kl, pg, dist)
            except Diverged as e:
                metrics.write({"step": step + 1, "kind": "diverged", "reason": str(e)})
                summary.update(status="diverged", step=step, diverged_at=step + 1, reason=str(e), last_eval=last_eval)
                write_summary()
                log.warning("diverged at step %d: %s", step + 1, e)
                return "diverged"
            rec.update(batch.stats)
            if ring is None:
                generator.sync(model)  # the next batch and evaluations sample from the updated weights
            if pipeline is not None:
                pipeline.publish(step + 1, model)
                rec.update(pipeline.stats())
            metrics.write({"step": step + 1, "kind": "train", **rec})
            done = step + 1
            if done == cfg.steps or (cfg.eval.every and done % cfg.eval.every == 0):
                last_eval = run_eval(done)
            if done == cfg.steps or done % cfg.ckpt_every == 0:
                save(done)
            summary["step"] = done
            write_summary()
            # Collective: a rank that stopped alone would leave the others blocked in the next step's all-reduce.
            if dist.sum(float(bool(signalled))) > 0 and done < cfg.steps:
                if done % cfg.ckpt_every:
                    save(done)
                log.warning("SIGUSR2 at step %d: checkpointed, handing over for requeue", done)
                hooked = False
                signal.signal(signal.SIGUSR2, prev_handler or signal.SIG_DFL)
                if callable(prev_handler) and signalled:
                    prev_handler(*signalled[0])
                return "interrupted"
        summary.update(status="completed", step=cfg.steps, final_eval=last_eval)
        write_summary()
        return "completed"
    finally:
        if hooked:
            signal.signal(signal.SIGUSR2, prev_handler or signal.SIG_DFL)
        if pipeline is not None:
            pipeline.close()
        if generator is not None:
            generator.close()
        metrics.close()
        torch.set_num_threads(threads)
