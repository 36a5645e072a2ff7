"""Simulated asynchronous RL: rollouts come from the policy as it was k optimizer steps ago.

A ring of the last k+1 parameter snapshots (on the CPU) stands in for an inference server that runs k steps ahead
of the trainer. It is deterministic, so a lagged run is reproducible and resumes exactly; the real overlapping
pipeline lives in klrl.pipeline and is checked against it.
"""

from __future__ import annotations

import copy
from collections import deque

import torch


class SnapshotRing:
    def __init__(self, model: torch.nn.Module, lag: int):
        self.lag = lag
        self.ring: deque[dict] = deque()
        self.behaviour = copy.deepcopy(model).eval().requires_grad_(False)

    def push(self, model: torch.nn.Module) -> None:
        """Record the parameters the trainer has now (call once per step, before generating)."""
        self.ring.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        while len(self.ring) > self.lag + 1:
            self.ring.popleft()

    def policy(self) -> tuple[torch.nn.Module, int]:
        """The behaviour policy (the oldest snapshot) and its staleness in optimizer steps."""
        self.behaviour.load_state_dict(self.ring[0])
        return self.behaviour, len(self.ring) - 1

    def state(self) -> list[dict]:
        return list(self.ring)

    def load_state(self, snapshots: list[dict]) -> None:
        self.ring = deque(snapshots)
