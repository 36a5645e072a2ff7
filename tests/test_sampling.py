"""The distribution klrl trains, logs and audits is the one its sampler draws from.

With the real generator (transformers `generate` on the embedded tiny model) at several temperatures and top-p:
the sampler's own per-token log-probs (its processed scores) equal the trainer's, the sequence importance ratio
between the two is 1, and k1 and k3 (two unbiased estimators of the same KL) agree on a policy that has drifted
from its reference. Then: evaluation samples at its own settings, and a response ends at every declared end id.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from klrl.cli.audit_mc import perturb
from klrl.core.distributions import token_logprobs
from klrl.core.estimators import k3
from klrl.training.evaluate import evaluate
from klrl.sampling.generation import HFGenerator
from klrl.models.registry import load_model
from klrl.sampling.rollout import (encode_prompts, end_ids, generate, response_logits, rollout_from_tokens, sampler_logits,
                          support_of)
from klrl.tasks import TASKS

from conftest import FAST, compose_cfg

SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.7, 0.9)]


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_cfg(*FAST)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    ref, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    ref.eval().requires_grad_(False)
    policy = copy.deepcopy(ref)
    perturb(policy, 1.0, seed=1)  # a policy that has drifted from its reference
    problems = task.sample_train(random.Random(0), 64)
    prompts = encode_prompts(tok, [p.prompt for p in problems], False) * 8  # 512 responses
    return cfg, task, policy, ref, tok, prompts


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_the_trainer_scores_the_distribution_the_sampler_drew_from(tiny, temperature, top_p):
    cfg, _, policy, ref, tok, prompts = tiny
    torch.manual_seed(0)
    ro = generate(policy, tok, prompts, 8, temperature, top_p, sampler_logprobs=True)
    mask = ro.response_mask
    with torch.no_grad():
        logits = sampler_logits(policy, ro, temperature, top_p)
        ours = token_logprobs(logits, ro.responses, mask)
        ref_lp = token_logprobs(sampler_logits(ref, ro, temperature, top_p, support=support_of(logits, top_p)),
                                ro.responses, mask)
        untempered = token_logprobs(response_logits(policy, ro), ro.responses, mask)
    n = len(prompts)

    # 1. Per token, to 1e-5.
    assert (ours - ro.sampler_logp).abs().max() < 1e-5
    if (temperature, top_p) != (1.0, 1.0):  # the test has teeth: softmax(z) is not what was sampled
        assert (untempered - ro.sampler_logp).abs().max() > 1e-2

    # 2. The sequence ratio pi_trainer / pi_sampler has mean 1 within Monte-Carlo error.
    ratio = torch.exp(((ours - ro.sampler_logp) * mask).sum(-1)).double()
    assert abs(ratio.mean().item() - 1) <= 3 * ratio.std().item() / n**0.5 + 1e-6

    # 3. k1 and k3 estimate the same KL(pi || pi_ref) of the sampled distribution: their sequence means agree.
    delta = torch.where(mask > 0, ours - ref_lp, torch.zeros_like(ours)).double()
    k1_seq, k3_seq = delta.sum(-1), (k3(delta) * mask).sum(-1)
    assert k1_seq.mean() > 0.1  # the policy has really drifted
    diff = k1_seq - k3_seq
    assert abs(diff.mean().item()) <= 3.5 * diff.std().item() / n**0.5, (diff.mean().item(), diff.std().item())


class Recording(HFGenerator):
    """The real hf generator, noting the sampling settings it was asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[tuple] = []

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
        self.calls.append((temperature, top_p, greedy))
        return super().generate(prompt_ids, max_new_tokens, temperature, top_p, greedy)


@pytest.mark.parametrize("extra,expected", [([], (1.0, 1.0)), (["eval.temperature=0.6", "eval.top_p=0.95"], (0.6, 0.95))])
def test_evaluation_samples_at_its_own_settings_not_trainings(tiny, extra, expected):
    _, task, policy, _, tok, _ = tiny
    cfg = compose_cfg(*FAST, "generation.temperature=0.5", "generation.top_p=0.8", *extra)
    gen = Recording(cfg, policy, tok)
    splits = {k: v[:4] for k, v in task.eval_splits().items()}
    out = evaluate(policy, tok, task, splits, cfg, seed=0, generator=gen)
    assert "eval/id/pass@1" in out and "eval/ood/greedy" in out
    sampled = {(t, p) for t, p, greedy in gen.calls if not greedy}
    assert sampled == {expected}
    assert any(greedy for _, _, greedy in gen.calls)


def test_a_response_ends_at_every_declared_end_id(tiny):
    """A checkpoint that declares several end ids (Llama-3.1 declares three): plain `generate`, with the model's
    own generation config, stops at each, and so does klrl's sampler, and the response mask ends after it."""
    cfg, _, policy, _, tok, prompts = tiny
    model = copy.deepcopy(policy)
    torch.manual_seed(0)
    first = generate(model, tok, prompts[:64], 1, greedy=True).responses[:, 0]
    second_end = int(first.mode().values)  # a token the model often emits first
    assert second_end != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, second_end]
    assert end_ids(model, tok) == sorted({tok.eos_token_id, second_end})

    with torch.no_grad():
        plain = model.generate(input_ids=torch.tensor([prompts[0]] * 32), do_sample=False, max_new_tokens=8,
                               pad_token_id=tok.pad_token_id)
    ours = generate(model, tok, [prompts[0]] * 32, 8, greedy=True)
    assert torch.equal(ours.responses, plain[:, len(prompts[0]):])  # the same stop, the same padding
    torch.manual_seed(1)
    ro = generate(model, tok, prompts, 8, 1.0, 1.0)
    stops = torch.isin(ro.responses, torch.tensor([tok.eos_token_id, second_end]))
    length = ro.response_mask.sum(-1).long()
    stopped = 0
    for i in range(len(prompts)):
        hits = stops[i].nonzero()
        if len(hits):  # ends right after its first end id, whichever it is
            stopped += 1
            assert length[i] == hits[0, 0] + 1
            assert (ro.responses[i, length[i]:] == tok.pad_token_id).all()
        else:
            assert length[i] == 8
    assert (ro.responses == second_end).any(dim=1).float().mean() > 0.1 and stopped > 0


@pytest.mark.parametrize("pad,eos", [(0, 2), (2, 2)])
def test_rollout_from_tokens_marks_exactly_the_sampled_tokens(pad, eos):
    """Row 2 stopped without EOS and is shorter than row 1: its padding is not response, even when the pad id is
    the EOS id (no phantom EOS)."""
    ro = rollout_from_tokens([[1, 5, 6], [1, 7]], [[10, 11, 12, 13, eos], [14, 15]], pad)
    assert ro.response_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ro.responses.tolist() == [[10, 11, 12, 13, eos], [14, 15, pad, pad, pad]]
    assert ro.attention_mask[1].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
