"""`pretrained`: a Hugging Face checkpoint (a hub id or a local directory), the paper's models.

- `eos_token`: the token(s) that end a response, replacing the checkpoint's own list (generation_config's
  eos_token_id, which by default ends a response at every id it declares: Llama-3.1 declares three). Qwen2.5-7B
  (base) declares <|endoftext|> only, but under the chat template a turn ends with <|im_end|>; without the override
  sampling runs on into invented turns until max_new_tokens, and the checker reads an answer from them.
With the hub switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), `check` wants the checkpoint in the cache
already and says how to put it there, instead of a long traceback once the run has started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from klrl.config.constraints import NonEmpty, OneOf, knob
from klrl.config.schema import ModelConfig
from klrl.errors import ConfigError
from klrl.hub import TRUE, hub_cache, in_hub_cache, is_local

ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class PretrainedModelConfig(ModelConfig):
    source: str = knob("pretrained", OneOf("pretrained"))
    hf_id: str = knob("???", NonEmpty())  # a hub id, or a local checkpoint directory
    revision: Optional[str] = knob(None, NonEmpty())
    attn_implementation: Optional[str] = knob(None, OneOf(*ATTENTION))  # None = transformers' choice
    eos_token: Any = None  # a token or a list of tokens; None = the checkpoint's generation_config list

    @staticmethod
    def check(cfg: DictConfig, root: DictConfig | None = None) -> None:
        hf_id = str(cfg.hf_id)
        if hf_id.startswith((".", "/", "~")) and not Path(hf_id).expanduser().is_dir():
            raise ConfigError(f"model.hf_id={hf_id!r} is not a directory; give a hub id or a local checkpoint directory")
        eos = cfg.eos_token
        tokens = [eos] if isinstance(eos, str) else list(eos) if eos is not None else []
        if eos is not None and (not tokens or not all(isinstance(t, str) and t for t in tokens)):
            raise ConfigError(f"model.eos_token={eos!r} is not valid; give a token or a list of tokens, e.g. "
                              "'<|im_end|>' or [<|eot_id|>,<|eom_id|>]")
        off = any(os.environ.get(k, "").lower() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        if off and not is_local(hf_id) and not in_hub_cache(hf_id, "models"):
            raise ConfigError(f"model.hf_id={hf_id!r} is not in the Hugging Face cache ({hub_cache()}) and the hub is off; "
                              f"pre-download it with `hf download {hf_id}` (or `huggingface-cli download {hf_id}`), "
                              "or give model.hf_id a local checkpoint directory")

class PretrainedSource:
    schema = PretrainedModelConfig

    @staticmethod
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path, dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from klrl.models.dtypes import DTYPES, storage_dtype

        dtype = dtype or DTYPES[storage_dtype(cfg)]

        kw = {"revision": cfg.revision} if cfg.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(cfg.hf_id, padding_side="left", **kw)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(cfg.hf_id, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation, **kw)
        if cfg.eos_token is not None:
            tokens = [cfg.eos_token] if isinstance(cfg.eos_token, str) else list(cfg.eos_token)
            vocab = tokenizer.get_vocab()
            for t in tokens:
                if t not in vocab:
                    raise ConfigError(f"model.eos_token={t!r} is not a token of {cfg.hf_id}")
            tokenizer.eos_token = tokens[0]
            ids = [vocab[t] for t in tokens]
            model.generation_config.eos_token_id = ids[0] if isinstance(cfg.eos_token, str) else ids
        return model, tokenizer
