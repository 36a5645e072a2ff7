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
from klrl.sampling.prefix import cache_key, cache_of, can_share, prefill, prompt_groups


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
    min_new_tokens: int = 0,
) -> Rollout:
    """Sample from the live model (the hf backend): transformers' forward with its KV cache, in klrl's own decoding
    loop (`decode`), which draws exactly as transformers' `generate` does, minus its per-token overhead.

    sampler_logprobs: also return, as `sampler_logp`, the log-probs of the sampled tokens under the distribution
    they were drawn from (the processed scores): a check of the trainer's `sampler_logits`. min_new_tokens: end ids
    are suppressed before that many tokens (benchmarks/vs_trl.py: the same response lengths on both sides); the
    responses then no longer come from the policy's distribution.

    Exactly softmax(logits / temperature), nucleus-cut at top_p, and nothing else: a checkpoint's own generation
    defaults (Qwen2.5-Instruct ships repetition_penalty=1.05, top_k=20) play no part, since each would make the
    samples come from a distribution other than the policy whose log-probs the loss uses."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ends = end_ids(model, tokenizer)
    ids, attn = left_pad(prompt_ids, pad)
    width = ids.shape[1]
    tokens, lp = decode(model, ids.to(device), attn.to(device), max_new_tokens, pad, ends, temperature, top_p,
                        greedy, sampler_logprobs, min_new_tokens)
    responses = tokens.cpu()
    rmask = response_mask(responses, ends)
    if lp is not None:
        lp = torch.where(rmask > 0, lp.cpu(), torch.zeros_like(rmask))
    return Rollout(torch.cat([ids, responses], -1), torch.cat([attn, rmask.long()], -1), width, rmask, lp)


def decode(model, ids: Tensor, attn: Tensor, max_new_tokens: int, pad: int, ends: Sequence[int],
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, want_logp: bool = False,
           min_new_tokens: int = 0) -> tuple[Tensor, Tensor | None]:
    """[B, R] sampled tokens (pad after a row's end id; R < max_new_tokens when every row ended early) and, with
    want_logp, their [B, R] log-probs under the processed distribution.

    Step for step what transformers' `generate(do_sample=True)` does with temperature / top_p (its
    TemperatureLogitsWarper and TopPLogitsWarper are `klrl.core.distributions.sampling_logits`) and nothing else
    configured: the same prefill (last position's logits only), the same cache, position ids and attention mask,
    one `torch.multinomial` draw per step from softmax of the processed float32 scores (argmax when greedy), end
    ids masked to -inf before min_new_tokens, finished rows fed pad. The same seed gives the same tokens."""
    B = ids.shape[0]
    key = cache_key(model)
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    logits, cache = prefill(model, ids, attn, pos, prompt_groups(ids, attn))
    end_t = torch.tensor(list(ends), device=ids.device)
    live = torch.ones(B, dtype=torch.bool, device=ids.device)
    ones = torch.ones((B, 1), dtype=attn.dtype, device=ids.device)
    toks, logps = [], []
    nxt_pos = pos[:, -1:]
    for t in range(max_new_tokens):
        scores = logits[:, -1, :].float()
        if t < min_new_tokens:
            scores[:, end_t] = float("-inf")
        if greedy:
            tok = scores.argmax(-1)
        else:
            scores = sampling_logits(scores, temperature, top_p)
            tok = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        if want_logp:
            logps.append(torch.log_softmax(scores, -1).gather(-1, tok[:, None]).squeeze(1))
        tok = torch.where(live, tok, torch.full_like(tok, pad))
        toks.append(tok)
        live &= ~torch.isin(tok, end_t)
        if t + 1 == max_new_tokens or not bool(live.any()):
            break
        attn = torch.cat([attn, ones], -1)
        nxt_pos = nxt_pos + 1
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=nxt_pos, use_cache=True,
                    **{key: cache})
        logits, cache = out.logits, cache_of(out)
    tokens = torch.stack(toks, 1) if toks else ids.new_zeros((B, 0))
    return tokens, (torch.stack(logps, 1) if want_logp and logps else None)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    toks = rollout.responses * rollout.response_mask.long() + tokenizer.pad_token_id * (1 - rollout.response_mask.long())
    return tokenizer.batch_decode(toks, skip_special_tokens=True)


def response_logits(model, rollout: Rollout) -> Tensor:
    """[B, R, V] logits of the next-token distributions that produced each response token. The LM head runs on
    those R positions only (`logits_to_keep`): the prompt's logits would be computed only to be thrown away. Rows
    that share a prompt (a group's samples) share one forward over it (`klrl.sampling.prefix`)."""
    device = next(model.parameters()).device
    ids, attn = rollout.input_ids.to(device), rollout.attention_mask.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    P = rollout.prompt_len
    R = ids.shape[1] - P
    groups = prompt_groups(ids[:, : P - 1], attn[:, : P - 1]) if P >= 2 and R >= 1 and can_share(model) else None
    if groups is None:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=R + 1)
        return out.logits[:, :-1]
    # The prompt but its last token once per group; from there on one pass per row (the last prompt position's
    # logits are the first response token's distribution, and the last response token's are never used).
    _, cache = prefill(model, ids[:, : P - 1], attn[:, : P - 1], pos[:, : P - 1], groups)
    out = model(input_ids=ids[:, P - 1 : -1], attention_mask=attn[:, :-1], position_ids=pos[:, P - 1 : -1],
                use_cache=True, **{cache_key(model): cache})
    return out.logits


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
