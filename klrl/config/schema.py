"""The structured config of a run: types (checked by Hydra at compose time) and declared constraints (checked by
`klrl.config.validate` before anything is built). The YAML files in conf/ fill these schemas.

Model sources and tasks subclass `ModelConfig` / `TaskConfig` next to their code (klrl/models, klrl/tasks), with
their own fields, constraints and a `check(node, cfg)` hook for what only they know (a package installed, data
present); the validator finds them through the composed node's type.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import MISSING

from klrl.config.constraints import Each, Int, Name, NonEmpty, NonNegative, OneOf, Positive, Range, Writable, knob
from klrl.core.estimators import ESTIMATORS
from klrl.core.losses import AGGREGATIONS, BASELINES, REWARD_FORMS
from klrl.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PLACEMENT_NAMES = ("none", "reward", "loss", "both")
BACKEND_NAMES = ("hf", "vllm")
MAX_SEED = 2**32 - 1


@dataclass
class ModelConfig:
    name: str = knob(MISSING, Name())  # names the warm-start cache entry and the run's rows in `klrl table`
    source: str = MISSING  # each source's schema constrains it to its own name
    dtype: str = knob("float32", OneOf(*DTYPE_NAMES))  # the dtype forward and backward passes compute in
    # Master weights (what AdamW updates) when they differ from dtype: bf16 weights lose any update below ~0.4% of
    # the weight, i.e. almost all of them at lr 1e-6. Needs fsdp, whose MixedPrecisionPolicy does the casting.
    param_dtype: Optional[str] = knob(None, OneOf(*DTYPE_NAMES))  # None = dtype
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the job's ranks (FSDP2)
    chat_template: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TaskConfig:
    name: str = knob(MISSING, NonEmpty())
    max_new_tokens: int = knob(16, Int(1, 2**20))  # the generation budget of a response
    eval_size: int = knob(200, Int(1))  # problems per evaluation split


@dataclass
class EstimatorConfig:
    # none, or a registered estimator (klrl.core.estimators.ESTIMATORS, read when checked: it may grow)
    name: str = knob(MISSING, OneOf(dynamic=lambda: ("none", *ESTIMATORS)))
    clamp_log_ratio: Optional[float] = knob(None, Positive())  # clamp delta = log(pi/pi_ref) to +-c; off by default
    clamp_value: Optional[float] = knob(None, Positive())  # clamp the per-token estimate to +-c; off by default


@dataclass
class PlacementConfig:
    name: str = knob(MISSING, OneOf(*PLACEMENT_NAMES))
    reward_form: Optional[str] = knob(None, OneOf(*REWARD_FORMS))  # seqsum | togo (reward placements only)
    reward_is_weight: Optional[bool] = None  # sequence-level IS weight on the reward KL (reward placements only)
    loss_is_weight: Optional[bool] = None  # rho_t * k_t (loss placements only)


@dataclass
class AlgoConfig:
    name: str = knob(MISSING, Name())
    baseline: str = knob("rloo", OneOf(*BASELINES))
    group_size: int = knob(8, Int(1, 2**16))
    prompts_per_step: int = knob(32, Int(1, 2**20))
    agg: str = knob("seq_sum", OneOf(*AGGREGATIONS))
    agg_norm: Optional[float] = knob(None, Positive())  # seq_mean_token_sum_norm's constant; None = max_new_tokens
    updates_per_batch: int = knob(1, Int(1, 1000))  # > 1 needs ratio_clip: several optimizer steps on one batch
    ratio_clip: Optional[float] = knob(None, Range(0.0, 1.0, lo_open=True, hi_open=True))  # PPO epsilon
    is_truncate: Optional[float] = knob(None, Range(1.0))  # cap on the token importance ratio (truncated IS)
    micro_batch_size: Optional[int] = knob(None, Int(1))  # sequences per forward/backward; None = the whole batch


@dataclass
class OptimConfig:
    lr: float = knob(1e-4, Positive())
    weight_decay: float = knob(0.0, NonNegative())
    betas: List[float] = knob(MISSING, Each(Range(0.0, 1.0, hi_open=True), length=2), factory=lambda: [0.9, 0.99])
    eps: float = knob(1e-8, Positive())
    grad_clip: float = knob(1.0, NonNegative())  # max global gradient norm; 0 = no clipping
    warmup_steps: int = knob(0, Int(0))


@dataclass
class EvalConfig:
    every: int = knob(0, Int(0))  # 0 = only at the start and at the end
    n_samples: int = knob(4, Int(1, 2**16))  # samples per problem for pass@1
    temperature: float = knob(1.0, Positive())  # pass@1 sampling, independent of training's (the paper: T = 1)
    top_p: float = knob(1.0, Range(0.0, 1.0, lo_open=True))
    greedy: bool = True
    bootstrap: int = knob(1000, Int(10, 10**7))  # resamples of the bootstrap CI
    at_start: bool = True
    batch_size: int = knob(512, Int(1))  # sequences generated at once; lower it for long generations on large models


@dataclass
class VLLMConfig:
    """Knobs of generation.backend=vllm alone (None = the default named here); set with hf they are refused."""

    gpu_memory_utilization: Optional[float] = knob(None, Range(0.0, 1.0, lo_open=True, hi_open=True))  # None = 0.4
    enforce_eager: Optional[bool] = None  # true: no CUDA graphs (slower decoding, faster start); None = false
    max_model_len: Optional[int] = knob(None, Int(1))  # longest prompt + response vLLM reserves KV cache for


@dataclass
class GenerationConfig:
    backend: str = knob("hf", OneOf(*BACKEND_NAMES))  # hf (transformers generate) | vllm (optional extra, CUDA)
    temperature: float = knob(1.0, Positive())
    top_p: float = knob(1.0, Range(0.0, 1.0, lo_open=True))
    vllm: VLLMConfig = knob(factory=VLLMConfig)

    @staticmethod
    def check(node, cfg) -> None:
        """The backend's own refusals: vLLM knobs without vLLM, vLLM where it cannot run."""
        knobs = node.get("vllm") or {}  # absent from the configs of runs made before the vllm backend
        if node.backend != "vllm":
            for key, value in knobs.items():
                if value is not None:
                    raise ConfigError(f"generation.vllm.{key}={value} has no effect with generation.backend="
                                      f"{node.backend}; it needs generation.backend=vllm")
            return
        if cfg.model.get("fsdp"):  # the engine loads whole tensors; an FSDP model holds shards
            raise ConfigError("generation.backend=vllm does not run with model.fsdp=true yet; use generation.backend=hf")
        reason = vllm_unavailable()
        if reason:
            raise ConfigError(reason)
        if cfg.async_mode == "pipeline":  # its generator process samples with the hf backend
            raise ConfigError("generation.backend=vllm does not run with async_mode=pipeline; use async_mode=sim "
                              "(async_level=k lags the engine's weights) or generation.backend=hf")


def vllm_unavailable() -> str | None:
    """Why generation.backend=vllm cannot run here (one line), or None. Cheap: does not import vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return ("generation.backend=vllm but vLLM is not installed here; install the extra (pip install -e '.[vllm]', "
                "on a machine with a CUDA GPU) or use generation.backend=hf")
    import torch

    if not torch.cuda.is_available():
        return "generation.backend=vllm needs a CUDA GPU and none is visible here; use generation.backend=hf"
    return None


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    estimator: EstimatorConfig = MISSING
    placement: PlacementConfig = MISSING
    algo: AlgoConfig = MISSING
    optim: OptimConfig = knob(factory=OptimConfig)
    eval: EvalConfig = knob(factory=EvalConfig)
    generation: GenerationConfig = knob(factory=GenerationConfig)
    beta: float = knob(0.05, NonNegative())
    steps: int = knob(100, Int(1, 10**9))
    seed: int = knob(0, Int(0, MAX_SEED))
    async_level: int = knob(0, Int(0, 10**6))  # rollouts from the policy as it was this many optimizer steps ago
    async_mode: str = knob("sim", OneOf("sim", "pipeline"))  # sim: deterministic snapshot ring | pipeline: a process
    # auto: continue the run in hydra.run.dir if it holds a checkpoint of the same config, start it if not;
    # true: continue, and refuse when there is nothing to continue; false: refuse a directory with a checkpoint.
    resume: Any = knob("auto", OneOf("auto", True, False))
    ckpt_every: int = knob(50, Int(1))
    # Log the exact KL, the entropy and every estimator's value every this many steps (they cost a full-vocabulary
    # pass over the policy's and the reference's logits); the loss and its own statistics are logged every step.
    extras_every: int = knob(1, Int(1))
    device: str = knob("auto", OneOf("auto", "cpu", "cuda"))
    cache_dir: str = knob("${oc.env:KLRL_CACHE,${oc.env:HOME}/.cache/klrl}", NonEmpty(), Writable())  # warm starts
    progress: bool = True
    tensorboard: bool = True
