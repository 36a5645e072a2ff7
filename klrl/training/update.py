"""One training step's optimizer update(s) on a batch: per micro-batch, one policy forward with grad and one
reference forward without, `policy_loss`, backward; then the gradient all-reduce, clipping and AdamW."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from klrl.core.distributions import token_logprobs
from klrl.core.estimators import sequence_estimates
from klrl.core.losses import KLSpec, PGSpec, policy_loss
from klrl.sampling.batch import Batch, behaviour_logprobs
from klrl.sampling.rollout import kl_and_entropy, sampler_logits, support_of
from klrl.training.distributed import Dist


class Diverged(Exception):
    """A non-finite log-prob, loss or gradient norm: the run stops here, as a result."""


class Step:
    """The state of one update: the batch split into micro-batches, and what is logged about it."""

    def __init__(self, batch: Batch, cfg, model, dist: Dist, extras: bool = True):
        self.batch, self.cfg, self.dist = batch, cfg, dist
        self.device = next(model.parameters()).device
        B = len(batch.rewards)
        mb = cfg.algo.micro_batch_size or B
        self.chunks = [slice(i, min(i + mb, B)) for i in range(0, B, mb)]
        self.n_tok_local = batch.rollout.response_mask.sum().item()
        self.n_tok = dist.sum(self.n_tok_local)
        self.token_norm = self.n_tok / (B * dist.world)  # the global count: token_mean stays exact when split
        self.temperature, self.top_p = cfg.generation.temperature, cfg.generation.top_p
        self.ref_lp: list = [None] * len(self.chunks)
        # Accumulated on the device and read once per step: an .item() per micro-batch would make the host wait
        # for the device each time.
        self.logged: dict = defaultdict(lambda: torch.zeros((), device=self.device, dtype=torch.float64))
        self.entropy_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.bad_logp = torch.zeros((), device=self.device, dtype=torch.bool)
        self.bad_loss = torch.zeros((), device=self.device, dtype=torch.bool)
        self.extras = extras  # the exact KL, entropy and every estimator's value: not every step (extras_every)

    def reference(self, j: int, ref, logits, logp, part, mask) -> None:
        """The reference's log-probs of micro-batch j (once per batch), and the logged KL yardsticks."""
        w = (self.chunks[j].stop - self.chunks[j].start) / len(self.batch.rewards)
        with torch.no_grad():
            ref_logits = sampler_logits(ref, part, self.temperature, self.top_p, support=support_of(logits, self.top_p))
            self.ref_lp[j] = token_logprobs(ref_logits, part.responses, mask)
            if self.extras:
                exact_kl, ent = kl_and_entropy(logits.detach(), ref_logits, mask)
                self.logged["kl/exact"] += exact_kl.mean() * w
                self.entropy_sum += ent.sum()
                for name, v in sequence_estimates(logp, self.ref_lp[j], mask).items():
                    self.logged[f"kl/{name}"] += v.mean() * w
            del ref_logits

    def backward(self, j: int, u: int, model, ref, old, kl: KLSpec, pg: PGSpec) -> None:
        """Micro-batch j of update u: the loss, scaled by its share of the batch, backpropagated."""
        c = self.chunks[j]
        part = self.batch.rollout.select(c)
        w = (c.stop - c.start) / len(self.batch.rewards)
        mask = part.response_mask.to(self.device)
        logits = sampler_logits(model, part, self.temperature, self.top_p)
        logp = token_logprobs(logits, part.responses, mask)
        self.bad_logp |= ~torch.isfinite(logp).all()
        if u == 0:
            self.reference(j, ref, logits, logp, part, mask)
        old_j = old[c].to(self.device) if old is not None else logp.detach()
        rewards = self.batch.rewards[c].to(self.device)
        out = policy_loss(logp, old_j, self.ref_lp[j], mask, rewards, self.cfg.algo.group_size, pg, kl,
                          token_norm=self.token_norm)
        self.bad_loss |= ~torch.isfinite(out.loss)
        (out.loss * w).backward()
        if u == 0:
            self.logged["loss"] += out.loss.detach() * w
            for k, v in out.stats.items():
                self.logged[k] += v.detach() * w

    def check(self) -> None:
        """Raise Diverged, on every rank at once, if any rank saw a non-finite log-prob or loss (one sync)."""
        bad_logp, bad_loss = bool(self.bad_logp), bool(self.bad_loss)
        if self.dist.sum(float(bad_logp or bad_loss)) > 0:
            raise Diverged("non-finite log-probs" if bad_logp else "non-finite loss" if bad_loss
                           else "non-finite values on another rank")


def optimizer_step(model, optimizer, scheduler, grad_clip: float, dist: Dist) -> float:
    """All-reduce (plain data parallelism), clip, step; the gradient norm before clipping. Raises Diverged."""
    dist.average_gradients(model)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # a DTensor under FSDP
    if not torch.isfinite(gn):
        raise Diverged("non-finite gradient norm")
    optimizer.step()
    scheduler.step()
    return gn.item()


def update(batch: Batch, cfg, model, ref, optimizer, scheduler, kl: KLSpec, pg: PGSpec, dist: Dist = Dist(),
           extras: bool = True) -> dict:
    """algo.updates_per_batch optimizer updates on one batch. Returns the step's metrics (averaged over ranks);
    raises Diverged. extras: also log the exact KL, the entropy and every estimator's value."""
    t0 = time.perf_counter()
    model.train()
    s = Step(batch, cfg, model, dist, extras)
    old = batch.old_logp
    if old is None and cfg.algo.updates_per_batch > 1:  # later updates are off-policy: keep the sampler's log-probs
        old = behaviour_logprobs(model, batch, s.chunks[0].stop, s.temperature, s.top_p)
    grad_norms = []
    for u in range(cfg.algo.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        for j in range(len(s.chunks)):
            s.backward(j, u, model, ref, old, kl, pg)
        s.check()
        grad_norms.append(optimizer_step(model, optimizer, scheduler, cfg.optim.grad_clip, dist))
    return metrics(s, batch, scheduler, grad_norms[0], time.perf_counter() - t0, cfg.algo.updates_per_batch)


def metrics(s: Step, batch: Batch, scheduler, grad_norm: float, t_train: float, updates: int) -> dict:
    rewards, B = batch.rewards, len(batch.rewards)
    logged = dict(zip(s.logged, torch.stack(list(s.logged.values())).tolist())) if s.logged else {}
    local = {"reward": rewards.mean().item(), "accuracy": (rewards >= 1).float().mean().item(),
             "response_length": s.n_tok_local / B, **logged}
    extras = {"entropy": s.dist.sum(s.entropy_sum.item()) / max(s.n_tok, 1)} if s.extras else {}  # per token
    return {
        **s.dist.mean_dict(local),
        **extras,
        "grad_norm": grad_norm,
        "lr": scheduler.get_last_lr()[0],
        "staleness": batch.staleness,
        "time/step": t_train + batch.gen_time,
        "time/generate": batch.gen_time,
        "tokens_per_s/generate": s.n_tok / max(batch.gen_time, 1e-9),
        "tokens_per_s/train": s.n_tok * updates / max(t_train, 1e-9),
    }
