"""klrl's decoding loop (klrl.sampling.rollout.decode) draws, token for token, what transformers' `generate` draws
for the same seed, with the options klrl samples with (temperature, top_p, greedy, min_new_tokens) and ragged,
left-padded prompts: the distribution sampled stays softmax(z / T) cut to the top-p nucleus, as the loss assumes."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from klrl.sampling.rollout import end_ids, generate, left_pad


@torch.no_grad()
def hf_generate(model, tok, prompts, n, greedy=False, min_new_tokens=0, **sampling):
    """transformers' own `generate` with exactly these options (the sampler klrl's loop replaces)."""
    ids, attn = left_pad(prompts, tok.pad_token_id)
    own, model.generation_config = model.generation_config, GenerationConfig(pad_token_id=tok.pad_token_id)
    try:
        return model.generate(input_ids=ids, attention_mask=attn, do_sample=not greedy, max_new_tokens=n,
                              pad_token_id=tok.pad_token_id, eos_token_id=end_ids(model, tok),
                              min_new_tokens=min_new_tokens, **({} if greedy else {**sampling, "top_k": 0}))
    finally:
        model.generation_config = own


@pytest.mark.parametrize("opts", [dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, top_p=0.9),
                                  dict(temperature=1.3, top_p=0.5), dict(greedy=True),
                                  dict(temperature=1.0, top_p=1.0, min_new_tokens=12)],
                         ids=["T1", "T0.7-p0.9", "T1.3-p0.5", "greedy", "min-new"])
def test_decode_draws_what_transformers_generate_draws(tiny, opts):
    _, model, tok, prompts = tiny
    assert len({len(p) for p in prompts}) > 1  # ragged prompts: the left padding is exercised
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref = hf_generate(model, tok, prompts, 12, **opts)
        torch.manual_seed(seed)
        ours = generate(model, tok, prompts, 12, **opts)
        assert torch.equal(ours.input_ids, ref), (opts, seed)
        if opts.get("min_new_tokens"):
            assert bool((ours.response_mask.sum(-1) == 12).all())


def test_decode_sampler_logprobs_are_those_of_the_sampled_distribution(tiny):
    _, model, tok, prompts = tiny
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, 8, 0.7, 0.9, sampler_logprobs=True)
    from klrl.sampling.rollout import policy_logprobs

    with torch.no_grad():
        ours = policy_logprobs(model, ro, 0.7, 0.9)
    torch.testing.assert_close(ro.sampler_logp, ours, rtol=0, atol=1e-4)
