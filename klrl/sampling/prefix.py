"""One forward per distinct prompt: a GRPO / RLOO group's samples share their prompt, so its KV cache is computed
once and shared by the group's rows, in generation's prefill and in the policy's and the reference's log-prob
passes. The same numbers (up to float rounding), the prompt's cost divided by the group size; the gradient flows
into the shared prompt positions from every row that reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prompt_groups(ids: Tensor, attn: Tensor) -> tuple[Tensor, Tensor] | None:
    """For left-padded prompts ids, attn [B, P]: the first row of each distinct prompt [U] (in order of first
    appearance) and each row's index into them [B]; None when no two rows share a prompt (nothing to save)."""
    B = ids.shape[0]
    uniq, inverse = torch.unique(torch.cat([ids, attn], -1), dim=0, return_inverse=True)
    U = uniq.shape[0]
    if U == B:
        return None
    rows = torch.arange(B, device=ids.device)
    first = torch.full((U,), B, device=ids.device, dtype=torch.long).scatter_reduce(0, inverse, rows, "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(U, device=ids.device)
    return first[order], rank[inverse]


def can_share(model) -> bool:
    """Whether the model's forward can hand a KV cache on to a second forward whose backward reaches the first:
    not under activation checkpointing in training (transformers then turns the cache off; the flag its
    checkpointed layers carry), nor under FSDP2, whose parameters are freed between two forwards of one backward."""
    if not (model.training and torch.is_grad_enabled()):
        return True
    from torch.distributed.fsdp import FSDPModule

    return not any(isinstance(m, FSDPModule) or getattr(m, "gradient_checkpointing", False) is True
                   for m in model.modules())


def cache_key(model) -> str:
    """The keyword of the KV cache in the model's forward: `cache` (transformers >= 5.2x), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache a transformers forward returned: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def prefill(model, ids: Tensor, attn: Tensor, pos: Tensor, groups: tuple[Tensor, Tensor] | None):
    """The model's forward over left-padded prompts ids, attn, pos [B, P] with its KV cache, once per distinct
    prompt (`groups`, from `prompt_groups`; None: once per row). Returns the last position's logits [B, 1, V] and
    the cache, expanded to the B rows (a transformers Cache: `batch_select_indices`)."""
    if groups is None:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits, cache_of(out)
    first, inverse = groups
    out = model(input_ids=ids[first], attention_mask=attn[first], position_ids=pos[first], use_cache=True,
                logits_to_keep=1)
    cache = cache_of(out)
    cache.batch_select_indices(inverse)
    return out.logits[inverse], cache
