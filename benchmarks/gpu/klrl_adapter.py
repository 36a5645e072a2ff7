"""The GPU kit's one door into klrl: every klrl-internal import of benchmarks/gpu/ is in this file.

klrl's trainer is being refactored; when an import path moves, this file (and nothing else in the kit) changes.
What it must keep doing: compose klrl's own config for the workload, set the policy and reference up as
`klrl.training` does (FSDP-of-1 with float32 masters and bf16 compute, or pure bf16), and run klrl's real
generation backend (`make_generator(...).generate`, the trainer's hf path) and klrl's real `update` (policy and
reference forward, the KL-regularised loss, backward, clipping, AdamW), then `generator.sync` as the trainer does
after each optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from klrl.cli.compose import register_configs

from klrl.config.specs import kl_spec, pg_spec
from klrl.training.distributed import setup, shard
from klrl.sampling.generation import make_generator
from klrl.models.tiny import build_char_tokenizer
from klrl.sampling.batch import Batch
from klrl.training.update import update

REPO = Path(__file__).resolve().parents[2]


def compose_config(*, group: int, prompts: int, micro: int, beta: float, mixed: bool):
    """klrl's `train` config with the workload's settings: GRPO baseline (what TRL's GRPOTrainer does), k3 in the
    loss, bf16 compute; FSDP-of-1 with float32 masters when `mixed`."""
    from hydra import compose, initialize_config_dir

    overrides = ["algo=grpo", f"algo.group_size={group}", f"algo.prompts_per_step={prompts}",
                 f"algo.micro_batch_size={micro}", "estimator=k3", "placement=loss", f"beta={beta}",
                 "model.dtype=bfloat16", *(["model.fsdp=true", "model.param_dtype=float32"] if mixed else [])]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing, as klrl.models.registry.load_model turns it on: `activation_checkpointing_enable` where
    transformers has it (newer 5.x), else the older `gradient_checkpointing_enable` (transformers 5.17 on the GPU
    machine has only that one)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


class KlrlStep:
    """One policy/reference pair driven by klrl's own generate and update code."""

    def __init__(self, model, ref, device: torch.device, *, mixed: bool, group: int, prompts: int, micro: int,
                 beta: float, lr: float):
        self.cfg = compose_config(group=group, prompts=prompts, micro=micro, beta=beta, mixed=mixed)
        self.dist = setup(device, mixed)
        enable_checkpointing(model)
        if mixed:  # as klrl.trainer.train: shard the policy (float32 masters) and the bf16 reference
            shard(model, device, torch.bfloat16)
            shard(ref, device, torch.bfloat16)
        self.model, self.ref = model, ref
        self.tokenizer = build_char_tokenizer()  # only its pad (0) / eos (2) ids matter: prompts are random ids
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # built on the sharded parameters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.generator = make_generator(self.cfg, model, self.tokenizer)
        self.kl, self.pg = kl_spec(self.cfg), pg_spec(self.cfg)

    def generate(self, prompt_ids: list[list[int]], new_tokens: int):
        """klrl's generation backend (cfg.generation.backend, hf by default) at temperature 1, top_p 1."""
        return self.generator.generate(prompt_ids, new_tokens, temperature=1.0)

    @staticmethod
    def response_tokens(rollout) -> int:
        return int(rollout.response_mask.sum())

    def update(self, rollout, rewards: torch.Tensor, gen_s: float) -> dict:
        """klrl's update on the batch (one optimizer step), then the generator sync the trainer does after it."""
        rec = update(Batch(rollout, rewards, gen_s), self.cfg, self.model, self.ref, self.optimizer, self.scheduler,
                     self.kl, self.pg, self.dist)
        self.generator.sync(self.model)
        return rec

    def describe(self) -> dict:
        c = self.cfg
        return {"algo": c.algo.name, "estimator": c.estimator.name, "placement": c.placement.name, "beta": c.beta,
                "generation_backend": c.generation.backend, "fsdp": bool(c.model.fsdp),
                "grad_clip": c.optim.grad_clip}

    def close(self) -> None:
        self.generator.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
