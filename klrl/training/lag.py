"""Simulated asynchronous RL: rollouts come from the policy as it was k optimizer steps ago.

A ring of the last k+1 parameter snapshots (on the CPU) stands in for an inference server that runs k steps ahead
of the trainer. It is deterministic, so a lagged run is reproducible and resumes exactly; the real overlapping
pipeline lives in klrl.training.pipeline and is checked against it.
"""

from __future__ import annotations

from collections import deque

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP parameter is a DTensor: this rank's shard


class SnapshotRing:
    """`behaviour` is a frozen copy of the policy, built by the caller (sharded like the policy under FSDP, where
    each rank then keeps only its own shard of every snapshot, in the behaviour copy's dtype)."""

    def __init__(self, behaviour: torch.nn.Module, lag: int):
        self.lag = lag
        self.ring: deque[dict] = deque()
        self.behaviour = behaviour.eval().requires_grad_(False)

    def push(self, model: torch.nn.Module) -> None:
        """Record the parameters the trainer has now (call once per step, before generating)."""
        into = self.behaviour.state_dict()
        self.ring.append({k: _local(v).detach().to("cpu", into[k].dtype, copy=True) for k, v in model.state_dict().items()})
        while len(self.ring) > self.lag + 1:
            self.ring.popleft()

    @torch.no_grad()
    def policy(self) -> tuple[torch.nn.Module, int]:
        """The behaviour policy (the oldest snapshot) and its staleness in optimizer steps."""
        for k, v in self.behaviour.state_dict().items():  # views of the parameters: copying in loads them
            _local(v).copy_(self.ring[0][k])
        return self.behaviour, len(self.ring) - 1

    def state(self) -> list[dict]:
        return list(self.ring)

    def load_state(self, snapshots: list[dict]) -> None:
        self.ring = deque(snapshots)
