"""Where each step's batch comes from, behind one small interface:

    get(step) -> Batch        the batch the trainer updates on at `step`
    publish(step, model)      after the optimizer step: the new weights reach the sampler; returns its metrics
    close()

on_policy  the generator samples from the live policy (synced after every step)
lagged     async_level=k, async_mode=sim: from the policy as it was k steps ago (a deterministic snapshot ring,
           resumable), with its behaviour log-probs
pipeline   async_level=k, async_mode=pipeline: a separate generator process runs ahead (klrl.training.pipeline)
"""

from __future__ import annotations

from typing import Protocol

import torch

from klrl.sampling.batch import Batch, behaviour_logprobs, collect
from klrl.sampling.generation import logprob_mismatch
from klrl.sampling.rollout import policy_logprobs
from klrl.training.distributed import Dist, gathered
from klrl.training.lag import SnapshotRing


class BatchSource(Protocol):
    def get(self, step: int) -> Batch: ...

    def publish(self, step: int, model: torch.nn.Module) -> dict: ...

    def close(self) -> None: ...


def sampler_check(batch: Batch, model, cfg, dist: Dist) -> dict:
    """The engine's own log-probs (vLLM) against the trainer's for the same weights: mismatch metrics."""
    ro = batch.rollout
    if ro.sampler_logp is None:
        return {}
    if batch.old_logp is not None:  # already computed, for the whole batch
        ours, part = batch.old_logp, ro
    else:  # one prompt group: a forward pass over G sequences, a small share of the step
        part = ro.select(slice(0, cfg.algo.group_size))
        ours = policy_logprobs(model, part, cfg.generation.temperature, cfg.generation.top_p)
    return dist.mean_dict(logprob_mismatch(part.sampler_logp, ours, part.response_mask))


class OnPolicy:
    def __init__(self, cfg, model, generator, tokenizer, task, dist: Dist):
        self.cfg, self.model, self.generator, self.tokenizer, self.task, self.dist = \
            cfg, model, generator, tokenizer, task, dist

    def get(self, step: int) -> Batch:
        with gathered(self.model), torch.no_grad():  # FSDP: one all-gather, then every rank samples alone
            batch = collect(step, self.cfg, self.generator, self.tokenizer, self.task, self.dist.rank, self.dist.world)
            batch.stats = sampler_check(batch, self.model, self.cfg, self.dist)
        return batch

    def publish(self, step: int, model) -> dict:
        self.generator.sync(model)  # the next batch and evaluations sample from the updated weights
        return {}

    def close(self) -> None:
        pass


class Lagged(OnPolicy):
    """Rollouts from the oldest of the last k+1 weight snapshots: an inference server k steps ahead, simulated."""

    def __init__(self, cfg, model, generator, tokenizer, task, dist: Dist, ring: SnapshotRing):
        super().__init__(cfg, model, generator, tokenizer, task, dist)
        self.ring = ring

    def get(self, step: int) -> Batch:
        self.ring.push(self.model)
        behaviour, staleness = self.ring.policy()
        self.generator.sync(behaviour)
        with gathered(behaviour):
            batch = collect(step, self.cfg, self.generator, self.tokenizer, self.task, self.dist.rank, self.dist.world)
            micro = self.cfg.algo.micro_batch_size or len(batch.rewards)
            batch.old_logp = behaviour_logprobs(behaviour, batch, micro, self.cfg.generation.temperature,
                                                self.cfg.generation.top_p)
        batch.staleness = staleness
        batch.stats = sampler_check(batch, self.model, self.cfg, self.dist)
        return batch

    def publish(self, step: int, model) -> dict:
        return {}  # the ring takes the new weights at the next get()


class Pipelined:
    """A generator process that runs up to async_level steps ahead."""

    def __init__(self, cfg, model, start: int):
        from klrl.training.pipeline import Pipeline

        self.pipeline = Pipeline(cfg, model, start_step=start)

    def get(self, step: int) -> Batch:
        return self.pipeline.get(step)

    def publish(self, step: int, model) -> dict:
        self.pipeline.publish(step + 1, model)
        return self.pipeline.stats()

    def close(self) -> None:
        self.pipeline.close()
