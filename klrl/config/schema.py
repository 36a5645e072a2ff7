"""The structured config of a run: types (checked by Hydra at compose time) and declared constraints (checked by
`klrl.config.validate` before anything is built). The YAML files in conf/ fill these schemas.

Model sources and tasks subclass `ModelConfig` / `TaskConfig` next to their code (klrl/models, klrl/tasks), with
their own fields, constraints and a `check(node, cfg)` hook for what only they know (a package installed, data
present); the validator finds them through the composed node's type.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import MISSING

from klrl.config.constraints import (Applies, Each, Int, Name, NonEmpty, NonNegative, OneOf, Positive, Range,
                                     Writable, knob)
from klrl.config.specs import PLACEMENTS, is_off_policy
from klrl.core.estimators import ESTIMATORS
from klrl.core.losses import AGGREGATIONS, BASELINES, REWARD_FORMS
from klrl.errors import ConfigError
from klrl.paths import install_hint

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PLACEMENT_NAMES = ("none", "reward", "loss", "both")
BACKEND_NAMES = ("hf", "vllm")
MAX_SEED = 2**32 - 1

# Where knobs act (see klrl.config.constraints.Applies); set elsewhere they are refused as silently ignored.
_placement = lambda c: f"with placement={c.placement.name}"  # noqa: E731
IN_REWARD = Applies(lambda c: PLACEMENTS[c.placement.name][0], "placement=reward or both", _placement)
IN_LOSS = Applies(lambda c: PLACEMENTS[c.placement.name][1], "placement=loss or both", _placement)
AN_ESTIMATOR = Applies(lambda c: c.estimator.name != "none", "an estimator", lambda c: "with estimator=none")
OFF_POLICY = Applies(is_off_policy, "async_level > 0 or algo.updates_per_batch > 1",
                     lambda c: "on-policy (every importance ratio is 1)")
PPO_CLIP = Applies(lambda c: c.algo.ratio_clip is not None, "algo.ratio_clip", lambda c: "without algo.ratio_clip")
CLAMPED = Applies(lambda c: c.estimator.clamp_value is not None, "estimator.clamp_value",
                  lambda c: "without estimator.clamp_value")
WEIGHTED = Applies(lambda c: bool(c.placement.get("loss_is_weight") or c.placement.get("loss_weight")),
                   "a weighted in-loss term (placement.loss_is_weight=true or placement.loss_weight)",
                   lambda c: "with an unweighted in-loss term (w = 1: the clamp bites the same value)")


def _baseline(*names: str) -> Applies:
    return Applies(lambda c: c.algo.baseline in names, "algo.baseline=" + " or ".join(names),
                   lambda c: f"with algo.baseline={c.algo.baseline}")


def _agg(name: str) -> Applies:
    return Applies(lambda c: c.algo.agg == name or c.placement.get("loss_agg") == name, f"algo.agg={name}",
                   lambda c: f"with algo.agg={c.algo.agg}")


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

    @staticmethod
    def char_prompts(cfg) -> bool:
        """Whether every prompt and answer is written in the tiny model's characters (digits and arithmetic)."""
        return False


@dataclass
class EstimatorConfig:
    # none, or a registered estimator (klrl.core.estimators.ESTIMATORS, read when checked: it may grow)
    name: str = knob(MISSING, OneOf(dynamic=lambda: ("none", *ESTIMATORS)))
    # clamp delta = log(pi/pi_ref) to +-c; off by default
    clamp_log_ratio: Optional[float] = knob(None, Positive(), applies=AN_ESTIMATOR)
    clamp_value: Optional[float] = knob(None, Positive(), applies=AN_ESTIMATOR)  # clamp the estimate to +-c
    # the value clamp bites the weighted in-loss term w * k rather than k (slime, NeMo-RL); None = false
    clamp_after_weight: Optional[bool] = knob(None, applies=CLAMPED & IN_LOSS & WEIGHTED)


@dataclass
class PlacementConfig:
    name: str = knob(MISSING, OneOf(*PLACEMENT_NAMES))
    reward_form: Optional[str] = knob(None, OneOf(*REWARD_FORMS), applies=IN_REWARD)  # seqsum | togo
    reward_is_weight: Optional[bool] = knob(None, applies=IN_REWARD)  # sequence-level IS weight on the reward KL
    # the reward's estimate from the log-probs of the policy that sampled (old: verl, TRL RLOO, OpenRLHF) or of the
    # current one (None = current); the same value on-policy, fixed across a batch's updates off-policy
    reward_logp: Optional[str] = knob(None, OneOf("current", "old"), applies=IN_REWARD)
    loss_is_weight: Optional[bool] = knob(None, applies=IN_LOSS)  # rho_t * k_t, rho_t = pi/pi_old (DeepSeek-V3.2)
    # other weights of the in-loss term (klrl.core.losses.loss_term): score = exp(l - sg(l)) k (NeMo-RL),
    # detached_rho = sg(k) + sg(rho delta)(l - sg(l)) (OpenRLHF unbiased_gradient); None = unweighted
    loss_weight: Optional[str] = knob(None, OneOf("score", "detached_rho"), applies=IN_LOSS)
    loss_agg: Optional[str] = knob(None, OneOf(*AGGREGATIONS), applies=IN_LOSS)  # the KL term's own; None = algo.agg


@dataclass
class AlgoConfig:
    name: str = knob(MISSING, Name())
    baseline: str = knob("rloo", OneOf(*BASELINES))
    group_size: int = knob(8, Int(1, 2**16))
    prompts_per_step: int = knob(32, Int(1, 2**20))
    agg: str = knob("seq_sum", OneOf(*AGGREGATIONS))
    # seq_mean_token_sum_norm's constant; None = task.max_new_tokens
    agg_norm: Optional[float] = knob(None, Positive(), applies=_agg("seq_mean_token_sum_norm"))
    adv_eps: Optional[float] = knob(None, NonNegative(), applies=_baseline("grpo", "rloo_std"))  # std + eps; None = 1e-6
    # grpo's group std: with Bessel's correction (unbiased: TRL, verl) or without (population: open-instruct)
    adv_std: Optional[str] = knob(None, OneOf("unbiased", "population"), applies=_baseline("grpo"))
    updates_per_batch: int = knob(1, Int(1, 1000))  # > 1 needs ratio_clip: several optimizer steps on one batch
    # PPO epsilon
    ratio_clip: Optional[float] = knob(None, Range(0.0, 1.0, lo_open=True, hi_open=True), applies=OFF_POLICY)
    is_truncate: Optional[float] = knob(None, Range(1.0), applies=OFF_POLICY)  # cap on the token ratio (truncated IS)
    dual_clip: Optional[float] = knob(None, Range(1.0, lo_open=True), applies=PPO_CLIP)  # PPO dual clip c (verl: 3)
    # clamp log(pi/pi_old) to +-c before exp in the policy gradient's ratio (verl, SkyRL: 20)
    ratio_log_clamp: Optional[float] = knob(None, Positive(), applies=OFF_POLICY)
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
        return (f"generation.backend=vllm but vLLM is not installed here; install the extra ({install_hint('vllm')}, "
                "on a machine with a CUDA GPU) or use generation.backend=hf")
    import torch

    if not torch.cuda.is_available():
        return "generation.backend=vllm needs a CUDA GPU and none is visible here; use generation.backend=hf"
    return None


@dataclass
class PresetConfig:
    """A framework's KL setting (conf/preset/, docs/frameworks.md): names and provenance only. The trainer reads
    none of it; the preset's YAML sets the knobs that make klrl's loss equal the framework's."""

    name: Optional[str] = knob(None, Name())  # the preset's own name, shown by `klrl audit preset=...`
    framework: Optional[str] = knob(None, NonEmpty())  # e.g. verl, TRL, OpenRLHF
    setting: Optional[str] = None  # the framework's own flags for this setting
    source: Optional[str] = None  # the upstream source line read (URL at a pinned commit)
    # the framework's off-policy knobs, as klrl overrides (refused on-policy, where they would have no effect)
    off_policy: Optional[str] = None
    differs: Optional[str] = None  # what klrl does not reproduce; empty = nothing


def _missing(*modules: str) -> str | None:
    """The first of `modules` that cannot be imported here (without importing it: a logger's package is heavy)."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):  # a blocked or broken package reads as missing
            return m
    return None


@dataclass
class TensorBoardConfig:
    """logger=tensorboard: events under <run dir>/tb (`tensorboard --logdir outputs`)."""

    flush_secs: float = knob(10.0, Positive())  # how often the event file is flushed to disk


@dataclass
class WandbConfig:
    """logger=wandb (optional extra: pip install 'klrl[wandb]'). The mode (online, offline, disabled) is W&B's own
    WANDB_MODE; the run's files go under its run directory."""

    project: str = knob("klrl", NonEmpty())
    entity: Optional[str] = knob(None, NonEmpty())  # None = the account's default
    group: Optional[str] = knob(None, NonEmpty())  # None = the sweep directory's name in a sweep, none otherwise
    tags: List[str] = knob(MISSING, Each(NonEmpty()), factory=list)


@dataclass
class MlflowConfig:
    """logger=mlflow (optional extra: pip install 'klrl[mlflow]')."""

    # None = a SQLite store beside the runs: <sweep dir>/mlflow.db in a sweep, <run dir>/mlflow.db otherwise
    tracking_uri: Optional[str] = knob(None, NonEmpty())
    experiment: Optional[str] = knob(None, NonEmpty())  # None = the sweep directory's name in a sweep, else "klrl"


# logger=X's package(s), and what to install
LOGGER_PACKAGES = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
NO_WANDB_LOGIN = ("logger=wandb: no W&B credentials were found (WANDB_API_KEY, ~/.netrc) and W&B is in online mode; "
                  "run `wandb login`, or set WANDB_MODE=offline to log locally")


def wandb_login_missing() -> bool:
    """True when W&B would run online and finds no credentials: what wandb.init would fail on after the run has
    started. Read as wandb.init reads them, without the network: the mode from WANDB_MODE or the settings files
    (`wandb offline` writes one; offline and disabled need no key), the key from WANDB_API_KEY (or an api_key
    setting), WANDB_IDENTITY_TOKEN_FILE, or the .netrc entry of W&B's host (`wandb login` writes it)."""
    config_dir = os.path.expanduser(os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb"))
    try:
        import wandb
        from wandb.sdk.lib.wbauth import read_netrc_auth  # W&B's own .netrc reader (its host, its format checks)

        settings = wandb.Settings(silent=True, settings_system=os.path.join(config_dir, "settings"))
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        if settings.mode in ("offline", "dryrun", "disabled") or settings.api_key or settings.identity_token_file:
            return False
        return not read_netrc_auth(host=settings.base_url)
    except Exception:  # noqa: BLE001 (settings, a key or a W&B version this cannot read: wandb.init tells)
        return False


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl: the backends chosen by `logger=[tensorboard,wandb,mlflow]` (a Hydra
    group with a list of options; conf/logger/), each a block of its own settings; None = not chosen."""

    tensorboard: Optional[TensorBoardConfig] = None
    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None

    @staticmethod
    def check(node, cfg) -> None:
        """A chosen backend whose package is missing is refused now, before anything is built or written; so is
        W&B online without credentials."""
        for name, modules in LOGGER_PACKAGES.items():
            gone = node.get(name) is not None and _missing(*modules)
            if gone:
                raise ConfigError(f"logger={name} needs the {gone} package: {install_hint(name)}")
        if node.get("wandb") is not None and wandb_login_missing():
            raise ConfigError(NO_WANDB_LOGIN)


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
    logger: LoggerConfig = knob(factory=LoggerConfig)  # logger=[tensorboard,wandb,mlflow] | none (conf/logger/)
    # Deprecated (use logger=...): false leaves TensorBoard out, true adds it; None = as logger says.
    tensorboard: Optional[bool] = None
    preset: Optional[PresetConfig] = None  # set by conf/preset/<name>.yaml; provenance only, the trainer ignores it
