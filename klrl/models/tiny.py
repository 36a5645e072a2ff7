"""`tiny`: the embedded default. A small Llama/Qwen2-style transformers model with a character tokenizer, both built
offline, given a short supervised warm start on the task so that RL starts from an accuracy that is neither 0 nor
1. The warm start is cached under cache_dir by a hash of everything that determines it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from klrl.config.constraints import Int, OneOf, Positive, knob
from klrl.config.schema import ModelConfig
from klrl.errors import ConfigError
from klrl.models.cache import atomic_save_pretrained, build_once, config_hash

log = logging.getLogger(__name__)
TINY_ALPHABET = "0123456789+-*/()=., "
MAX_POSITIONS = 256  # rotary positions need no table: this only bounds what a prompt + response may be


@dataclass
class WarmStartConfig:
    steps: int = knob(1000, Int(0, 10**7))
    lr: float = knob(3e-3, Positive())
    batch_size: int = knob(64, Int(1, 2**16))


@dataclass
class TinyModelConfig(ModelConfig):
    """A small transformers causal LM built from a config, with a character tokenizer built offline."""

    source: str = knob("tiny", OneOf("tiny"))
    arch: str = knob("llama", OneOf("llama", "qwen2"))
    hidden_size: int = knob(64, Int(1, 8192))
    num_layers: int = knob(2, Int(1, 128))
    num_heads: int = knob(4, Int(1, 256))
    intermediate_size: int = knob(256, Int(1, 65536))
    cpu_threads: Optional[int] = knob(1, Int(1, 4096))  # a tiny model runs fastest on one thread
    warmstart: WarmStartConfig = knob(factory=WarmStartConfig)

    @staticmethod
    def check(node, cfg) -> None:
        if node.hidden_size % node.num_heads:
            raise ConfigError(f"model.hidden_size={node.hidden_size} must be divisible by model.num_heads="
                              f"{node.num_heads}")
        if not OmegaConf.get_type(cfg.task).char_prompts(cfg.task):
            raise ConfigError(f"model=tiny cannot read task={cfg.task.name}'s prompts (its character tokenizer knows "
                              f"only {TINY_ALPHABET!r}); choose a pretrained model, e.g. model=smollm2-135m")


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
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(mc, dtype=torch.float32)


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
    def load(cfg: DictConfig, task, task_cfg: DictConfig, cache_dir: Path, dtype=torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Only what determines the warm start: the architecture, the warm-start recipe and the problems it is
        # shown (not how RL keeps or shards the weights, nor evaluation settings); concurrent jobs share it.
        arch = {k: cfg[k] for k in ("source", "arch", "hidden_size", "num_layers", "num_heads", "intermediate_size")}
        key = config_hash(arch, OmegaConf.to_container(cfg.warmstart), task.warmstart_signature(), TINY_ALPHABET,
                          MAX_POSITIONS, "v2")
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
