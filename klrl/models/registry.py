"""Model sources: how a model config becomes a (causal LM, tokenizer) pair.

`tiny`: a small Llama/Qwen2-style transformers model with a character tokenizer, both built offline, given a short
supervised warm start on the task so that RL starts from an accuracy that is neither 0 nor 1. The warm start is
cached under cache_dir by a hash of everything that determines it.
`hf`: any Hugging Face checkpoint (hub id or local directory), the paper's models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from klrl.config.schema import ConfigError, HFModelConfig, TinyModelConfig
from klrl.models.pretrained import PretrainedSource
from klrl.models.smollm2 import SmolLM2Source

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_ALPHABET = "0123456789+-*/()=., "


def build_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(TINY_ALPHABET)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    # padding_side must go to the constructor: set later, it does not survive save/reload in transformers 5.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )


def build_tiny_model(cfg: DictConfig, vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = AutoConfig.for_model(
        cfg.arch,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(mc, dtype=torch.float32)


def config_hash(*parts: Any) -> str:
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atomic_save_pretrained(model, tokenizer, dest: Path) -> None:
    """Write to a temporary sibling directory, then rename: a crash never leaves a half-written checkpoint."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # e.g. save_pretrained on a rank other than 0 writes no model
            raise RuntimeError(f"save_pretrained wrote no model to {tmp}; not caching an incomplete checkpoint")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same warm start first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(path: Path, build) -> None:
    """Run `build` (which creates path) unless path exists. In a multi-rank job rank 0 builds while the others
    wait: transformers' save_pretrained writes weights on rank 0 only, and a rank racing it would cache a checkpoint
    with a tokenizer and no model."""
    import torch.distributed as dist

    ranks = dist.is_available() and dist.is_initialized()
    if not path.exists() and (not ranks or dist.get_rank() == 0):
        build()
    if ranks:
        dist.barrier()


def warm_start(model, tokenizer, task, cfg: DictConfig) -> None:
    """Supervised fine-tuning on (prompt, answer<eos>) pairs, loss on the answer tokens only."""
    ws = cfg.warmstart
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / ws.steps)
    model.train()
    for _ in range(ws.steps):
        problems = task.sample_warmstart(rng, ws.batch_size)
        prompts = tokenizer([p.prompt for p in problems], add_special_tokens=True)["input_ids"]
        answers = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
        seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    log.info("warm start done: final SFT loss %.4f", loss.item())


class TinySource:
    schema = TinyModelConfig

    @staticmethod
    def check(cfg: DictConfig) -> None:
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} must be divisible by model.num_heads={cfg.num_heads}")
        if cfg.arch not in ("llama", "qwen2"):
            raise ConfigError(f"model.arch={cfg.arch!r} is not valid; choose from: llama, qwen2")

    @staticmethod
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # How the weights are sharded and kept during RL does not change the warm start (nor its cache key).
        what = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("fsdp", "param_dtype")}
        key = config_hash(what, task_cfg, TINY_ALPHABET, "v1")
        path = Path(cache_dir) / "warmstart" / f"{cfg.name}-{task_cfg.name}-{key}"

        def build() -> None:
            log.info("warm-starting the tiny model (cached at %s)", path)
            tokenizer = build_char_tokenizer()
            torch.manual_seed(0)
            model = build_tiny_model(cfg, len(tokenizer))
            warm_start(model, tokenizer, task, cfg)
            atomic_save_pretrained(model, tokenizer, path)

        build_once(path, build)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


class HFSource:
    schema = HFModelConfig

    @staticmethod
    def check(cfg: DictConfig) -> None:
        hf_id = str(cfg.hf_id)
        if hf_id.startswith((".", "/", "~")) and not Path(hf_id).expanduser().is_dir():
            raise ConfigError(f"model.hf_id={hf_id!r} is not a directory; give a hub id or a local checkpoint directory")

    @staticmethod
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"revision": cfg.revision} if cfg.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(cfg.hf_id, padding_side="left", **kw)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            cfg.hf_id, dtype=DTYPES[storage_dtype(cfg)], attn_implementation=cfg.attn_implementation, **kw
        )
        return model, tokenizer


SOURCES: dict[str, Any] = {"tiny": TinySource, "hf": HFSource, "pretrained": PretrainedSource, "smollm2": SmolLM2Source}


def storage_dtype(cfg: DictConfig) -> str:
    """The dtype the parameters are kept in: the master weights' if set apart, else the compute dtype."""
    return cfg.get("param_dtype") or cfg.dtype


def load_model(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: str | Path):
    model, tokenizer = SOURCES[cfg.source].load(cfg, task, task_cfg, Path(cache_dir))
    model.to(DTYPES[storage_dtype(cfg)])
    if cfg.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()  # renamed in transformers 5
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
