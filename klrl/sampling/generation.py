"""Generation backends behind one interface; `generation.backend` picks one for training and evaluation alike.

`make_generator(cfg, model, tokenizer)` returns a Generator:
  generate(prompt_ids, max_new_tokens, temperature, top_p, greedy) -> Rollout   sample one response per prompt
  sync(model)    from now on sample from `model`'s current weights (the trainer calls it after each optimizer step)
  close()        free the engine

hf    the live module's own forward and KV cache, in klrl's decoding loop (klrl.sampling.rollout.generate: token for
      token what transformers `generate` draws, without its per-token overhead); sync only rebinds the module.
vllm  a vLLM engine in this process, on the trainer's GPU (optional extra `klrl[vllm]`); sync copies the weights
      in. Its rollouts have the hf layout (`rollout_from_tokens`) plus vLLM's own log-probs of the sampled tokens.

Samples are seeded from torch's global generator in both backends, so the callers' `torch.manual_seed` makes them
reproducible. Prompts are token ids, encoded by `klrl.sampling.rollout.encode_prompts` (the task's template) for both.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor

from klrl.errors import ConfigError
from klrl.sampling.rollout import Rollout, end_ids, generate, rollout_from_tokens

VLLM_MEMORY = 0.4  # default share of the GPU for vLLM (weights + KV cache); the trainer keeps the rest


class Generator(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False) -> Rollout: ...

    def sync(self, model: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


class HFGenerator:
    """Sampling from a live module (its forward, in klrl.sampling.rollout.decode): whatever weights it holds."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
                 min_new_tokens: int = 0) -> Rollout:
        self.model.eval()  # no dropout while sampling; update() switches back to train()
        # A sharded (FSDP) model is sampled inside the caller's klrl.training.distributed.gathered().
        return generate(self.model, self.tokenizer, prompt_ids, max_new_tokens, temperature, top_p, greedy,
                        min_new_tokens=min_new_tokens)

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model

    def close(self) -> None:
        pass


class VLLMGenerator:
    """A vLLM engine colocated with the trainer, in its process.

    vLLM starts from the trainer model's config alone (written to a temporary directory under cache_dir) with
    dummy weights; `sync` then loads the trainer's tensors through the model's own `load_weights`, which maps HF
    names onto vLLM's fused layers (qkv, gate_up) and skips tied heads. The engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `LLM.apply_model` hands it the tensors as they are: a GPU-to-GPU copy,
    nothing serialized. After each load the prefix cache is reset, since its KV blocks came from the old weights.
    """

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, tokenizer):
        import torch.distributed as tdist

        if tdist.is_initialized() and tdist.get_world_size() > 1:
            raise ConfigError("generation.backend=vllm runs one engine in a single trainer process; use "
                              "generation.backend=hf with several ranks")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm reads its environment
        from vllm import LLM

        v = cfg.generation.vllm
        root = Path(cfg.cache_dir) / "vllm"
        root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="engine-", dir=root))
        self.pad, self.ends = tokenizer.pad_token_id, end_ids(model, tokenizer)
        try:
            model.config.save_pretrained(self.dir)
            tokenizer.save_pretrained(self.dir)
            kw = {"max_model_len": v.max_model_len} if v.max_model_len is not None else {}
            self.llm = LLM(
                model=str(self.dir),
                dtype=cfg.model.dtype,  # explicit: vLLM's "auto" would turn a float32 checkpoint into float16
                load_format="dummy",  # the weights come from sync, below
                skip_tokenizer_init=True,  # prompts arrive as token ids; responses go back as token ids
                # No model generation defaults (extra EOS ids, penalties) merged into the explicit sampling
                # parameters below, which mirror the hf backend's.
                generation_config="vllm",
                # Log-probs of the distribution sampled from (after temperature and top-p), which is what the
                # trainer scores (klrl.core.distributions); vLLM's default reports the raw softmax(z).
                logprobs_mode="processed_logprobs",
                seed=cfg.seed,
                gpu_memory_utilization=VLLM_MEMORY if v.gpu_memory_utilization is None else v.gpu_memory_utilization,
                enforce_eager=bool(v.enforce_eager),
                **kw,
            )
            self.sync(model)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        weights = [(k, t.detach()) for k, t in model.state_dict().items()]

        def load(m):  # runs on vLLM's model; returns only names, never tensors
            loaded = m.load_weights(weights)
            return None if loaded is None else sorted({n for n, _ in m.named_parameters()} - set(loaded))

        missing = self.llm.apply_model(load)[0]
        if missing:  # a parameter left at its dummy value would sample garbage, silently
            raise RuntimeError(f"vLLM weight sync left {len(missing)} parameters unset, e.g. {missing[:3]}")
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False) -> Rollout:
        from vllm import SamplingParams

        # One seed per request from torch's generator: the caller's torch.manual_seed fixes the samples, as for hf.
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        # logprobs=0: only the sampled token's, of the processed (tempered, nucleus-cut) distribution, the one the
        # trainer's sampler_logits scores. Every end id stops a row and is kept, as hf does.
        params = [
            SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                           max_tokens=max_new_tokens, stop_token_ids=self.ends, logprobs=0, detokenize=False,
                           seed=base + i)
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outs]
        logps = [[pos[t].logprob for t, pos in zip(r, o.outputs[0].logprobs)] for r, o in zip(responses, outs)]
        return rollout_from_tokens(prompt_ids, responses, self.pad, logps)

    def close(self) -> None:
        from vllm.distributed import cleanup_dist_env_and_memory

        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()  # the in-process engine set up a one-rank process group and holds GPU memory
        shutil.rmtree(self.dir, ignore_errors=True)


BACKENDS = {"hf": HFGenerator, "vllm": VLLMGenerator}


def make_generator(cfg: DictConfig, model: torch.nn.Module, tokenizer) -> Generator:
    """The backend `cfg.generation.backend` names, sampling from `model`'s current weights."""
    return BACKENDS[cfg.generation.backend](cfg, model, tokenizer)


def logprob_mismatch(sampler_logp: Tensor, trainer_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the engine's log-probs of its sampled tokens are from the trainer's for the same weights (kernels,
    precision and batching differ): mean and max |log pi_engine - log pi_trainer| per token, and the per-token k3
    estimate of KL(pi_engine || pi_trainer), E[exp(d) - 1 - d] with d = log pi_trainer - log pi_engine."""
    real = mask > 0
    d = (trainer_logp.float() - sampler_logp.float().to(trainer_logp.device))[real.to(trainer_logp.device)]
    if d.numel() == 0:
        return {}
    return {
        "mismatch/logp_abs_mean": d.abs().mean().item(),
        "mismatch/logp_abs_max": d.abs().max().item(),
        "mismatch/kl_k3": (torch.expm1(d) - d).mean().item(),
    }
