"""Structured config schemas (types checked by Hydra at compose time) and the semantic validation of a run.

The YAML files in conf/ fill these schemas. ``validate`` turns every combination that would be silently inert or
meaningless into a ``ConfigError`` with one line naming the bad value and the valid choices. It runs before any
model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from klrl.core.distributions import Sampling
from klrl.core.estimators import ESTIMATORS
from klrl.core.losses import AGGREGATIONS, BASELINES, REWARD_FORMS, KLSpec, PGSpec


from klrl.paths import CONF_DIR  # noqa: F401  (re-exported)


class ConfigError(ValueError):
    """A bad configuration value; its message is the single line the user sees."""


@dataclass
class WarmStartConfig:
    steps: int = 1000
    lr: float = 3e-3
    batch_size: int = 64


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # tiny | hf | smollm2
    dtype: str = "float32"  # the dtype forward and backward passes compute in
    # Master weights (what AdamW updates) when they differ from dtype: bf16 weights lose any update below ~0.4% of
    # the weight, i.e. almost all of them at lr 1e-6. Needs fsdp, whose MixedPrecisionPolicy does the casting.
    param_dtype: Optional[str] = None  # None = dtype
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the job's ranks (FSDP2)
    chat_template: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TinyModelConfig(ModelConfig):
    """A small transformers causal LM built from a config, with a character tokenizer built offline."""

    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64
    cpu_threads: Optional[int] = 1  # a model this small runs fastest on one thread; spare cores serve parallel runs
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class HFModelConfig(ModelConfig):
    """A pretrained Hugging Face checkpoint: a hub id or a local directory."""

    hf_id: str = MISSING
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None


@dataclass
class TaskConfig:
    name: str = MISSING
    max_new_tokens: int = 16
    eval_size: int = 200  # problems per evaluation split


@dataclass
class ArithTaskConfig(TaskConfig):
    """Synthetic addition: in-domain operands of `digits` digits, out-of-domain `ood_digits`."""

    digits: int = 2
    ood_digits: int = 1
    train_size: int = 0  # 0 = sample fresh problems every step


@dataclass
class EstimatorConfig:
    name: str = MISSING  # none, or a registered estimator (klrl.core.estimators.ESTIMATORS)
    clamp_log_ratio: Optional[float] = None  # clamp delta = log(pi/pi_ref) to +-c before the estimator; off by default
    clamp_value: Optional[float] = None  # clamp the per-token estimate to +-c; off by default


@dataclass
class PlacementConfig:
    name: str = MISSING  # none | reward | loss | both
    reward_form: Optional[str] = None  # seqsum | togo (reward placements only)
    reward_is_weight: Optional[bool] = None  # sequence-level IS weight on the reward KL (reward placements only)
    loss_is_weight: Optional[bool] = None  # rho_t * k_t (loss placements only)


@dataclass
class AlgoConfig:
    name: str = MISSING
    baseline: str = "rloo"
    group_size: int = 8
    prompts_per_step: int = 32
    agg: str = "seq_sum"
    agg_norm: Optional[float] = None  # seq_mean_token_sum_norm's constant; None = task.max_new_tokens (Dr. GRPO)
    updates_per_batch: int = 1  # > 1 needs ratio_clip: several optimizer steps on one batch, PPO style
    ratio_clip: Optional[float] = None
    is_truncate: Optional[float] = None
    micro_batch_size: Optional[int] = None  # sequences per forward/backward; None = the whole batch


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass
class EvalConfig:
    every: int = 0  # 0 = only at the start and at the end
    n_samples: int = 4  # samples per problem for pass@1
    temperature: float = 1.0  # pass@1 sampling, independent of training's (the paper's protocol: T = 1, top-p 1)
    top_p: float = 1.0
    greedy: bool = True
    bootstrap: int = 1000
    at_start: bool = True
    batch_size: int = 512  # sequences generated at once; lower it for long generations on large models


@dataclass
class VLLMConfig:
    """Knobs of generation.backend=vllm alone (None = the default named here); set with hf they are refused."""

    gpu_memory_utilization: Optional[float] = None  # share of the GPU for vLLM's weights + KV cache; None = 0.4
    enforce_eager: Optional[bool] = None  # true: no CUDA graphs (slower decoding, faster start); None = false
    max_model_len: Optional[int] = None  # longest prompt + response vLLM reserves KV cache for; None = the model's


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf (transformers generate) | vllm (optional extra, CUDA): see klrl/generation.py
    temperature: float = 1.0
    top_p: float = 1.0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    estimator: EstimatorConfig = MISSING
    placement: PlacementConfig = MISSING
    algo: AlgoConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    beta: float = 0.05
    steps: int = 100
    seed: int = 0
    async_level: int = 0  # rollouts from the policy as it was this many optimizer steps ago
    async_mode: str = "sim"  # sim: deterministic snapshot ring | pipeline: generation in a separate process
    resume: bool = False
    ckpt_every: int = 50
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str = "${oc.env:KLRL_CACHE,${oc.env:HOME}/.cache/klrl}"
    progress: bool = True
    tensorboard: bool = True


def register_configs() -> None:
    """Schemas and generated options into Hydra's ConfigStore (idempotent: composing code calls it again, so that
    an estimator registered at run time is a config choice too).

    - every registered estimator is an option of the `estimator` group (`estimator=k3+`): adding one takes one
      function in klrl.core.estimators, no YAML;
    - each task and model source brings its own schema (`schema` attribute), stored as `<group>/<name>_schema` for
      its YAML to list first in its defaults."""
    from klrl.models.registry import SOURCES
    from klrl.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, source in SOURCES.items():
        cs.store(group="model", name=f"{name}_schema", node=source.schema)
    for name, task in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=task.schema)
    for name in ESTIMATORS:
        cs.store(group="estimator", name=name, node=EstimatorConfig(name=name))



PLACEMENTS = {"none": (False, False), "reward": (True, False), "loss": (False, True), "both": (True, True)}


def _choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is not valid; choose from: {', '.join(map(str, choices))}")


def kl_spec(cfg: DictConfig) -> KLSpec:
    """The KL part of the loss, from a validated config."""
    in_reward, in_loss = PLACEMENTS[cfg.placement.name]
    p = cfg.placement
    return KLSpec(
        estimator=None if cfg.estimator.name == "none" else cfg.estimator.name,
        beta=float(cfg.beta),
        in_reward=in_reward,
        reward_form=p.reward_form or "seqsum",
        reward_is_weight=bool(p.reward_is_weight),
        in_loss=in_loss,
        loss_is_weight=bool(p.loss_is_weight),
        clamp_log_ratio=cfg.estimator.get("clamp_log_ratio"),
        clamp_value=cfg.estimator.get("clamp_value"),
    )


def pg_spec(cfg: DictConfig, budget: int | None = None) -> PGSpec:
    """The policy-gradient side of the loss. budget: the generation budget that seq_mean_token_sum_norm divides by
    when algo.agg_norm is unset (default task.max_new_tokens; the audit's toy passes its own length)."""
    a = cfg.algo
    norm = None
    if a.agg == "seq_mean_token_sum_norm":
        norm = float(a.get("agg_norm") or (budget if budget is not None else cfg.task.max_new_tokens))
    return PGSpec(baseline=a.baseline, agg=a.agg, agg_norm=norm, ratio_clip=a.ratio_clip, is_truncate=a.is_truncate)


def sampling_spec(cfg: DictConfig) -> Sampling:
    """How training samples (and so which distribution it trains): generation.temperature / top_p."""
    g = cfg.get("generation") or {}
    return Sampling(float(g.get("temperature", 1.0)), float(g.get("top_p", 1.0)))


def _generation(cfg: DictConfig) -> None:
    from klrl.sampling.generation import BACKENDS, vllm_unavailable

    g = cfg.generation
    _choice("generation.backend", g.backend, tuple(BACKENDS))
    knobs = g.get("vllm") or {}  # absent from the configs of runs made before the vllm backend
    if g.backend != "vllm":
        for key, value in knobs.items():
            if value is not None:
                raise ConfigError(f"generation.vllm.{key}={value} has no effect with generation.backend={g.backend}; "
                                  "it needs generation.backend=vllm")
        return
    if cfg.model.get("fsdp"):  # the engine loads whole tensors; an FSDP model holds shards
        raise ConfigError("generation.backend=vllm does not run with model.fsdp=true yet; use generation.backend=hf")
    reason = vllm_unavailable()
    if reason:
        raise ConfigError(reason)
    if cfg.async_mode == "pipeline":  # its generator process samples with the hf backend
        raise ConfigError("generation.backend=vllm does not run with async_mode=pipeline; use async_mode=sim "
                          "(async_level=k lags the engine's weights) or generation.backend=hf")
    mem, max_len = knobs.get("gpu_memory_utilization"), knobs.get("max_model_len")
    if mem is not None and not 0 < mem < 1:
        raise ConfigError(f"generation.vllm.gpu_memory_utilization={mem} must be in (0, 1)")
    if max_len is not None and max_len < 1:
        raise ConfigError(f"generation.vllm.max_model_len={max_len} must be >= 1")


def validate(cfg: DictConfig) -> None:
    """Reject bad values and silently-inert combinations. Cheap: touches no model and no data."""
    from klrl.models.registry import DTYPES, SOURCES
    from klrl.tasks import TASKS

    _choice("estimator", cfg.estimator.name, ("none", *ESTIMATORS))  # the registry as it is now
    _choice("placement", cfg.placement.name, tuple(PLACEMENTS))
    _choice("algo.baseline", cfg.algo.baseline, BASELINES)
    _choice("algo.agg", cfg.algo.agg, AGGREGATIONS)
    _choice("model.source", cfg.model.source, SOURCES)
    _choice("task.name", cfg.task.name, tuple(TASKS))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible here; use device=auto or device=cpu")
    _generation(cfg)
    _choice("model.dtype", cfg.model.dtype, tuple(DTYPES))
    m = cfg.model
    if m.param_dtype is not None:
        _choice("model.param_dtype", m.param_dtype, tuple(DTYPES))
        if m.param_dtype != m.dtype and not m.fsdp:
            raise ConfigError(f"model.param_dtype={m.param_dtype} (master weights apart from model.dtype={m.dtype}) needs "
                              "model.fsdp=true, whose mixed-precision policy casts them; or drop model.param_dtype")
    if m.fsdp and cfg.async_mode == "pipeline":
        raise ConfigError("model.fsdp=true does not run with async_mode=pipeline (one trainer process); "
                          "use async_mode=sim for lagged rollouts")

    beta, est, place = cfg.beta, cfg.estimator.name, cfg.placement.name
    if beta < 0:
        raise ConfigError(f"beta={beta} is negative; the KL coefficient must be >= 0")
    if est == "none":
        if beta != 0:
            raise ConfigError(f"beta={beta} with estimator=none would be ignored; set beta=0 or choose an estimator")
        if place != "none":
            raise ConfigError(f"placement={place} with estimator=none would be ignored; drop it (placement=none)")
    else:
        if place == "none":
            raise ConfigError(f"estimator={est} with placement=none would be ignored; choose reward, loss or both")
        if beta == 0:
            raise ConfigError(f"beta=0 makes estimator={est} inert; use estimator=none for a run without KL")
    in_reward, in_loss = PLACEMENTS[place]
    p = cfg.placement
    for key, applies, where in (
        ("reward_form", in_reward, "reward or both"),
        ("reward_is_weight", in_reward, "reward or both"),
        ("loss_is_weight", in_loss, "loss or both"),
    ):
        if p[key] is not None and not applies:
            raise ConfigError(f"placement.{key}={p[key]} has no effect with placement={place}; it needs {where}")
    if p.reward_form is not None:
        _choice("placement.reward_form", p.reward_form, REWARD_FORMS)
    if p.reward_is_weight and p.reward_form == "togo":
        raise ConfigError("placement.reward_is_weight=true applies to the seqsum form only; set placement.reward_form=seqsum")
    for key in ("clamp_log_ratio", "clamp_value"):
        c = cfg.estimator.get(key)
        if c is not None and (est == "none" or not c > 0):
            raise ConfigError(f"estimator.{key}={c} needs an estimator and a positive value")

    a = cfg.algo
    if a.group_size < 2 and a.baseline != "none":
        raise ConfigError(f"algo.group_size={a.group_size} is too small for baseline {a.baseline}; it needs >= 2")
    if p.reward_is_weight and a.group_size < 2:
        raise ConfigError(f"algo.group_size={a.group_size}: placement.reward_is_weight needs >= 2 (leave-one-out)")
    for key in ("prompts_per_step", "updates_per_batch"):
        if a[key] < 1:
            raise ConfigError(f"algo.{key}={a[key]} must be >= 1")
    if a.updates_per_batch > 1 and a.ratio_clip is None and a.is_truncate is None:
        raise ConfigError(
            f"algo.updates_per_batch={a.updates_per_batch} needs algo.ratio_clip (PPO) or algo.is_truncate: "
            "later updates are off-policy"
        )
    if a.ratio_clip is not None and a.is_truncate is not None:
        raise ConfigError("algo.ratio_clip and algo.is_truncate are alternatives; set only one")
    if a.get("agg_norm") is not None:
        if a.agg != "seq_mean_token_sum_norm":
            raise ConfigError(f"algo.agg_norm={a.agg_norm} has no effect with algo.agg={a.agg}; it needs "
                              "algo.agg=seq_mean_token_sum_norm")
        if not a.agg_norm > 0:
            raise ConfigError(f"algo.agg_norm={a.agg_norm} must be > 0 (the generation budget, in tokens)")
    if a.micro_batch_size is not None and (a.micro_batch_size < 1 or a.micro_batch_size % a.group_size):
        raise ConfigError(f"algo.micro_batch_size={a.micro_batch_size} must be a positive multiple of group_size={a.group_size}")
    _choice("async_mode", cfg.async_mode, ("sim", "pipeline"))
    if cfg.async_level < 0:
        raise ConfigError(f"async_level={cfg.async_level} must be >= 0")
    if cfg.async_level > 0 and a.is_truncate is None and a.ratio_clip is None:
        raise ConfigError(
            f"async_level={cfg.async_level} makes rollouts off-policy: set algo.is_truncate (the paper uses 8) or algo.ratio_clip"
        )
    if cfg.async_mode == "pipeline" and cfg.async_level < 1:
        raise ConfigError("async_mode=pipeline needs async_level >= 1 (how far generation may run ahead)")
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    if cfg.ckpt_every < 1:
        raise ConfigError(f"ckpt_every={cfg.ckpt_every} must be >= 1")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.eval.n_samples < 1 or cfg.eval.every < 0:
        raise ConfigError(f"eval.n_samples={cfg.eval.n_samples} / eval.every={cfg.eval.every} must be >= 1 / >= 0")
    for where in ("generation", "eval"):
        t, p = cfg[where].temperature, cfg[where].top_p
        if not t > 0 or not 0 < p <= 1:
            raise ConfigError(f"{where}.temperature={t} / {where}.top_p={p}: need temperature > 0 and top_p in (0, 1]")
    if cfg.task.eval_size < 1:  # every task's eval splits are cut to this size
        raise ConfigError(f"task.eval_size={cfg.task.eval_size} must be >= 1")
    TASKS[cfg.task.name].check(cfg.task)
    SOURCES[cfg.model.source].check(cfg.model)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
