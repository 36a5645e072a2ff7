"""One forward per distinct prompt (klrl.sampling.prefix): the logits, log-probs and gradient of the shared pass
equal those of one full pass per row, for groups of identical prompts among ragged, left-padded ones; generation
with a shared prefill still draws what transformers' `generate` draws."""

from __future__ import annotations

import copy

import pytest
import torch

from klrl.sampling.prefix import can_share, prompt_groups
from klrl.sampling.rollout import generate, response_logits


def grouped(prompts, n_prompts=6, group=4):
    """Prompts of different lengths, each repeated `group` times in a row: a GRPO / RLOO batch."""
    return [p for p in prompts[::4][:n_prompts] for _ in range(group)]


def test_prompt_groups_finds_each_distinct_prompt_in_order_of_first_appearance():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [1, 2, 3], [0, 0, 7]])
    attn = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    first, inverse = prompt_groups(ids, attn)
    assert first.tolist() == [0, 1, 4]
    assert inverse.tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(ids[first][inverse], ids)
    assert prompt_groups(ids[:2], attn[:2]) is None  # nothing shared: one pass per row as before


def _unshared(model, ro, monkeypatch):
    """response_logits with no rows grouped (one pass per row over the same rows)."""
    import klrl.sampling.rollout as rollout

    with monkeypatch.context() as m:
        m.setattr(rollout, "prompt_groups", lambda ids, attn: None)
        return response_logits(model, ro)


@pytest.mark.parametrize("max_new", [1, 9])
def test_shared_prompt_pass_gives_the_logits_and_gradient_of_one_pass_per_row(tiny, max_new, monkeypatch):
    _, model, tok, prompts = tiny
    torch.manual_seed(0)
    ro = generate(model, tok, grouped(prompts), max_new)
    assert prompt_groups(ro.input_ids[:, : ro.prompt_len - 1], ro.attention_mask[:, : ro.prompt_len - 1]) is not None
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    la, lb = response_logits(a, ro), _unshared(b, ro, monkeypatch)
    assert la.shape == lb.shape == (*ro.responses.shape, model.config.vocab_size)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(la)  # a generic scalar of every logit: the whole Jacobian is exercised
    ((la * w).sum()).backward()
    ((lb * w).sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):  # float32 rounding of sums of many terms
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5 * float(pb.grad.abs().max()), msg=name)
        assert float(pb.grad.abs().max()) > 0, name


def test_activation_checkpointing_keeps_one_pass_per_row(tiny):
    _, model, _, _ = tiny
    m = copy.deepcopy(model).train()
    assert can_share(m)
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    assert not can_share(m)  # transformers drops the cache under checkpointing in training
    with torch.no_grad():
        assert can_share(m)  # no backward to replay: the cache stays


def test_generation_with_a_shared_prefill_draws_what_generate_draws(tiny):
    from test_decode import hf_generate

    _, model, tok, prompts = tiny
    batch = grouped(prompts)
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref = hf_generate(model, tok, batch, 12)
        torch.manual_seed(seed)
        assert torch.equal(generate(model, tok, batch, 12).input_ids, ref), seed
