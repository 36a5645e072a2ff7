"""`pretrained`: the `hf` source with the two things the paper's models need beyond it.

- `eos_token`: the token that ends a response. Qwen2.5-7B (base) declares <|endoftext|> as its EOS, but under the
  chat template a turn ends with <|im_end|>; without the override sampling runs on into invented turns until
  max_new_tokens, and the checker reads an answer from them.
With the hub switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), `check` wants the checkpoint in the cache
already and says how to put it there, instead of a long traceback once the run has started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from klrl.config import ConfigError, HFModelConfig
from klrl.tasks.hub import TRUE, hub_cache, in_hub_cache, is_local


@dataclass
class PretrainedModelConfig(HFModelConfig):
    eos_token: Optional[str] = None  # None = the tokenizer's own


class PretrainedSource:
    schema = PretrainedModelConfig

    @staticmethod
    def check(cfg: DictConfig) -> None:
        from klrl.models import HFSource

        HFSource.check(cfg)
        hf_id = str(cfg.hf_id)
        off = any(os.environ.get(k, "").lower() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        if off and not is_local(hf_id) and not in_hub_cache(hf_id, "models"):
            raise ConfigError(f"model.hf_id={hf_id!r} is not in the Hugging Face cache ({hub_cache()}) and the hub is off; "
                              f"pre-download it with `hf download {hf_id}` (or `huggingface-cli download {hf_id}`), "
                              "or give model.hf_id a local checkpoint directory")

    @staticmethod
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path):
        from klrl.models import HFSource

        model, tokenizer = HFSource.load(cfg, task, task_cfg, cache_dir)
        if cfg.eos_token:
            if cfg.eos_token not in tokenizer.get_vocab():
                raise ConfigError(f"model.eos_token={cfg.eos_token!r} is not a token of {cfg.hf_id}")
            tokenizer.eos_token = cfg.eos_token
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model, tokenizer
