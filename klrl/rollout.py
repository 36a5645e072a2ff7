"""Sampling responses and scoring their log-probabilities.

Log-probs come from one forward pass over prompt + response with explicit position ids, so that left-padded
prompts get the same positions as in `generate` (otherwise the "on-policy" log-probs would silently differ from
the sampling distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from klrl.estimators import exact_token_kl


@dataclass
class Rollout:
    input_ids: Tensor  # [B, P + R] prompt (left-padded) + response (right-padded)
    attention_mask: Tensor  # [B, P + R]
    prompt_len: int  # P
    response_mask: Tensor  # [B, R] 1 for response tokens up to and including the first EOS
    sampler_logp: Tensor | None = None  # [B, R] log-probs the sampling engine reported (vLLM), 0 at padding

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    def select(self, idx: slice) -> "Rollout":
        lp = None if self.sampler_logp is None else self.sampler_logp[idx]
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.prompt_len, self.response_mask[idx], lp)


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> list[list[int]]:
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def response_mask(responses: Tensor, eos_id: int) -> Tensor:
    """1 up to and including the first EOS of each row (all ones if the response was cut at max_new_tokens)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).to(torch.float32)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """[B, P] prompts left-padded to the longest, and their attention mask."""
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p) :] = 1
    return ids, attn


def rollout_from_tokens(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    logprobs: Sequence[Sequence[float]] | None = None,
) -> Rollout:
    """The Rollout `generate` builds, from token lists (what an engine such as vLLM returns): prompts left-padded,
    responses right-padded with pad_id to the longest (as `generate` pads rows that finished early), masked after
    the first EOS. `logprobs[i][t]`, the engine's log-prob of response token t, becomes `sampler_logp`."""
    ids, attn = left_pad(prompt_ids, pad_id)
    width = max(map(len, response_ids))
    resp = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    for i, r in enumerate(response_ids):
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    rmask = response_mask(resp, eos_id)
    lp = None
    if logprobs is not None:
        lp = torch.zeros((len(response_ids), width), dtype=torch.float32)
        for i, row in enumerate(logprobs):
            lp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        lp = lp * rmask
    return Rollout(torch.cat([ids, resp], -1), torch.cat([attn, rmask.long()], -1), ids.shape[1], rmask, lp)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Sample with transformers `generate` from the live model (the hf backend).

    Exactly softmax(logits / temperature), nucleus-cut at top_p, and nothing else: a checkpoint's own generation
    defaults (Qwen2.5-Instruct ships repetition_penalty=1.05, top_k=20) are kept out, since transformers fills every
    option the caller leaves unset from them, and each would make the samples come from a distribution other than
    the policy whose log-probs the loss uses."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids, attn = left_pad(prompt_ids, pad)
    width = ids.shape[1]
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    own, model.generation_config = model.generation_config, GenerationConfig(pad_token_id=pad)
    try:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=not greedy,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            # transformers turns this on for FSDP modules (an all-reduce per token); klrl samples on gathered weights.
            synced_gpus=False,
            **sampling,
        ).cpu()
    finally:
        model.generation_config = own
    responses = out[:, width:]
    rmask = response_mask(responses, tokenizer.eos_token_id)
    return Rollout(out, torch.cat([attn, rmask.long()], -1), width, rmask)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    toks = rollout.responses * rollout.response_mask.long() + tokenizer.pad_token_id * (1 - rollout.response_mask.long())
    return tokenizer.batch_decode(toks, skip_special_tokens=True)


def response_logits(model, rollout: Rollout) -> Tensor:
    """[B, R, V] logits of the next-token distributions that produced each response token."""
    device = next(model.parameters()).device
    attn = rollout.attention_mask.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rollout.input_ids.to(device), attention_mask=attn, position_ids=pos, use_cache=False)
    return out.logits[:, rollout.prompt_len - 1 : -1]


def token_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """log softmax(logits)[token], computed in float32, zero at padding (padding rows may hold non-finite logits)."""
    logits = logits.float()
    lp = logits.gather(-1, tokens[..., None].to(logits.device)).squeeze(-1) - torch.logsumexp(logits, -1)
    return torch.where(mask.to(lp.device) > 0, lp, torch.zeros_like(lp))


def kl_and_entropy(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: exact sum_t KL(pi(.|s_t)||pi_ref(.|s_t)), and the summed per-token entropy."""
    with torch.no_grad():
        # One sequence at a time: its float32 [R, V] temporaries over a 150k vocabulary are already GBs.
        kls, ents = zip(*(exact_token_kl(a, b) for a, b in zip(logits.split(1), ref_logits.split(1))))
        kl, ent = torch.cat(kls), torch.cat(ents)
        real = mask.to(kl.device) > 0
        zero = torch.zeros_like(kl)
        return torch.where(real, kl, zero).sum(-1), torch.where(real, ent, zero).sum(-1)
