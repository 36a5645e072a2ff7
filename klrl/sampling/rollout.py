"""Sampling responses and scoring their log-probabilities.

Log-probs come from one forward pass over prompt + response with explicit position ids, so that left-padded
prompts get the same positions as in `generate` (otherwise the "on-policy" log-probs would silently differ from
the sampling distribution), and are those of the distribution the sampler draws from (`klrl.core.distributions`).
A response ends at, and includes, the first of the model's end-of-sequence ids (`end_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from klrl.core.distributions import exact_kl_entropy, sampling_logits, token_logprobs


@dataclass
class Rollout:
    input_ids: Tensor  # [B, P + R] prompt (left-padded) + response (right-padded)
    attention_mask: Tensor  # [B, P + R]
    prompt_len: int  # P
    response_mask: Tensor  # [B, R] 1 for the sampled tokens: up to and including the first end id
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


def end_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response: those of the model's generation_config `eos_token_id` (an id or a
    list: Llama-3.1 declares three), and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def response_mask(responses: Tensor, eos_ids: int | Sequence[int]) -> Tensor:
    """[B, R] 1 up to and including the first end id of each row (all ones if the response was cut at
    max_new_tokens), 0 after it."""
    is_eos = torch.isin(responses, torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids)))
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
    logprobs: Sequence[Sequence[float]] | None = None,
) -> Rollout:
    """The Rollout `generate` builds, from token lists (what an engine such as vLLM returns, each response ending
    at its stop token or at the budget): prompts left-padded, responses right-padded with pad_id to the longest.
    Exactly the returned tokens are response (mask 1), whatever the pad and end ids are: padding never is, even
    when pad_id is an end id. `logprobs[i][t]`, the engine's log-prob of response token t, becomes `sampler_logp`."""
    ids, attn = left_pad(prompt_ids, pad_id)
    width = max(1, max(map(len, response_ids)))
    resp = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(response_ids), width), dtype=torch.float32)
    for i, r in enumerate(response_ids):
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[i, : len(r)] = 1
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
    sampler_logprobs: bool = False,
) -> Rollout:
    """Sample with transformers `generate` from the live model (the hf backend).

    sampler_logprobs: also return, as `sampler_logp`, the log-probs of the sampled tokens under the distribution
    `generate` itself drew them from (its processed scores): a check of the trainer's `sampler_logits`, costing a
    [steps, B, V] tensor.

    Exactly softmax(logits / temperature), nucleus-cut at top_p, and nothing else: a checkpoint's own generation
    defaults (Qwen2.5-Instruct ships repetition_penalty=1.05, top_k=20) are kept out, since transformers fills every
    option the caller leaves unset from them, and each would make the samples come from a distribution other than
    the policy whose log-probs the loss uses."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ends = end_ids(model, tokenizer)
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
            eos_token_id=ends,
            # transformers turns this on for FSDP modules (an all-reduce per token); klrl samples on gathered weights.
            synced_gpus=False,
            output_scores=sampler_logprobs,
            return_dict_in_generate=sampler_logprobs,
            **sampling,
        )
    finally:
        model.generation_config = own
    seqs = (out.sequences if sampler_logprobs else out).cpu()
    responses = seqs[:, width:]
    rmask = response_mask(responses, ends)
    lp = None
    if sampler_logprobs:
        scores = torch.stack(out.scores, 1).float().cpu()  # [B, R, V] what each token was drawn from
        lp = torch.log_softmax(scores, -1).gather(-1, responses[..., None]).squeeze(-1)
        lp = torch.where(rmask > 0, lp, torch.zeros_like(lp))
    return Rollout(seqs, torch.cat([attn, rmask.long()], -1), width, rmask, lp)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    toks = rollout.responses * rollout.response_mask.long() + tokenizer.pad_token_id * (1 - rollout.response_mask.long())
    return tokenizer.batch_decode(toks, skip_special_tokens=True)


def response_logits(model, rollout: Rollout) -> Tensor:
    """[B, R, V] logits of the next-token distributions that produced each response token. The LM head runs on
    those R positions only (`logits_to_keep`): the prompt's logits would be computed only to be thrown away."""
    device = next(model.parameters()).device
    attn = rollout.attention_mask.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    R = rollout.input_ids.shape[1] - rollout.prompt_len
    out = model(input_ids=rollout.input_ids.to(device), attention_mask=attn, position_ids=pos, use_cache=False,
                logits_to_keep=R + 1)
    return out.logits[:, :-1]


def sampler_logits(model, rollout: Rollout, temperature: float = 1.0, top_p: float = 1.0,
                   support: Tensor | None = None) -> Tensor:
    """[B, R, V] logits of the distribution the sampler drew each response token from (float32, tempered, -inf
    outside the nucleus, which always holds the sampled token). support: cut to this bool mask instead (the
    reference is cut to its policy's support)."""
    logits = response_logits(model, rollout)
    keep = rollout.responses.to(logits.device) if top_p < 1.0 and support is None else None
    return sampling_logits(logits, temperature, top_p, keep=keep, support=support)


def support_of(logits: Tensor, top_p: float) -> Tensor | None:
    """The support of sampler logits as a bool mask (None when top_p = 1: the whole vocabulary)."""
    return None if top_p >= 1.0 else torch.isfinite(logits.detach())


def policy_logprobs(model, rollout: Rollout, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """[B, R] log-probs of the sampled tokens under `model`'s sampling distribution, 0 at padding."""
    logits = sampler_logits(model, rollout, temperature, top_p)
    return token_logprobs(logits, rollout.responses, rollout.response_mask)


EXTRAS_BYTES = 2**28  # temporaries of the exact KL / entropy pass: chunks of sequences stay within this


def kl_and_entropy(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence [B]: exact sum_t KL(pi(.|s_t)||pi_ref(.|s_t)) and the summed per-token entropy, from the
    sampler logits [B, R, V] of the policy and of the reference (`klrl.core.distributions.sampling_logits`).
    In chunks of sequences whose float32 temporaries (a few [n, R, V] tensors) stay within EXTRAS_BYTES: the
    whole micro-batch at once for a small vocabulary, one sequence at a time for a 150k one at 7B lengths."""
    with torch.no_grad():
        B, R, V = logits.shape
        n = max(1, EXTRAS_BYTES // max(1, 6 * 4 * R * V))
        kls, ents = zip(*(exact_kl_entropy(a, b) for a, b in zip(logits.split(n), ref_logits.split(n))))
        kl, ent = torch.cat(kls), torch.cat(ents)
        real = mask.to(kl.device) > 0
        zero = torch.zeros_like(kl)
        return torch.where(real, kl, zero).sum(-1), torch.where(real, ent, zero).sum(-1)
