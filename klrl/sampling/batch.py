"""What one training step trains on: prompts drawn for the step, G responses each, their rewards, and the
log-probs of the policy that sampled them. Every random draw of a step is seeded from (seed, step, rank), so a
resumed run replays exactly the batches an uninterrupted run would have drawn."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from klrl.sampling.rollout import Rollout, decode_responses, encode_prompts, policy_logprobs


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


@dataclass
class Batch:
    """What one step trains on: responses, their rewards, and the log-probs of the policy that sampled them."""

    rollout: Rollout
    rewards: Tensor  # [B]
    gen_time: float
    old_logp: Tensor | None = None  # [B, R] behaviour log-probs; None = on-policy (the live policy's, detached)
    staleness: int = 0  # trainer steps (batches) between the sampling policy and the policy being updated
    stats: dict = field(default_factory=dict)  # extra metrics of the step (the sampler's log-prob mismatch)


def collect(step: int, cfg, generator, tokenizer, task, rank: int = 0, world: int = 1) -> Batch:
    """Sample this rank's share of the step's prompts (its contiguous 1/world), G responses each, with
    `generator`, and score them with the task's checker."""
    t0 = time.perf_counter()
    G = cfg.algo.group_size
    prompts = task.sample_train(random.Random(step_seed(cfg.seed, step)), cfg.algo.prompts_per_step)
    share = len(prompts) // world
    problems = [p for p in prompts[rank * share : (rank + 1) * share] for _ in range(G)]
    torch.manual_seed(step_seed(cfg.seed, step) + 7919 * rank)
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems], cfg.model.chat_template)
    ro = generator.generate(prompt_ids, cfg.task.max_new_tokens, cfg.generation.temperature, cfg.generation.top_p)
    rewards = torch.tensor([task.score(p, t) for p, t in zip(problems, decode_responses(tokenizer, ro))])
    return Batch(ro, rewards, time.perf_counter() - t0)


@torch.no_grad()
def behaviour_logprobs(policy, batch: Batch, micro: int, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """[B, R] log-probs of the sampled tokens under the sampling distribution of the policy that generated them
    (recomputed by a forward pass per micro-batch)."""
    out = []
    for i in range(0, len(batch.rewards), micro):
        out.append(policy_logprobs(policy, batch.rollout.select(slice(i, i + micro)), temperature, top_p))
    return torch.cat(out)
