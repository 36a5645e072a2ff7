"""The dtypes a model config may name, as torch dtypes."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from klrl.config.schema import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def storage_dtype(cfg: DictConfig) -> str:
    """The dtype the parameters are kept in: the master weights' if set apart, else the compute dtype."""
    return cfg.get("param_dtype") or cfg.dtype
