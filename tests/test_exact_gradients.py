"""Exact expected gradients of the real training loss, for every KL configuration, against theory.

Each configuration is composed from the same Hydra config the trainer uses and turned into the loss by the same
`kl_spec`/`pg_spec`; `klrl.toy.expected_gradient` then weights the real `policy_loss` gradient of every possible
group of G sampled sequences by its probability. Targets are exact gradients of divergences (paper.md §1.3-1.4).
Adding an estimator: add one row here.
"""

from __future__ import annotations

import pytest
import torch

from klrl.config import kl_spec, pg_spec
from klrl.losses import KLSpec, PGSpec
from klrl.toy import TabularPolicy, exact_targets, expected_gradient

from conftest import compose_cfg

POLICY = TabularPolicy(vocab=3, length=3, seed=0)
REF = TabularPolicy(vocab=3, length=3, seed=1)
T = exact_targets(POLICY, REF)
ZERO = torch.zeros_like(T["reverse_kl"])

# (command-line overrides, expected gradient of the KL part of the loss divided by beta)
ROWS = [
    ("estimator=k1 placement=reward", T["reverse_kl"]),
    ("estimator=k1 placement=reward placement.reward_form=togo", T["reverse_kl"]),
    ("estimator=k1 placement=loss", ZERO),
    ("estimator=k1 placement=both", T["reverse_kl"]),
    ("estimator=k1 placement=loss placement.loss_is_weight=true", T["token_reverse"]),
    ("estimator=k2 placement=loss", T["token_reverse"]),
    ("estimator=k3 placement=loss", T["context_forward"]),
    ("estimator=k3 placement=reward", T["reverse_kl"] - T["context_forward"]),
    ("estimator=k3 placement=reward placement.reward_form=togo", T["reverse_kl"] - T["context_forward"]),
    ("estimator=k3 placement=both", T["reverse_kl"]),
    ("estimator=k3 placement=loss placement.loss_is_weight=true", T["token_reverse"]),
    ("estimator=none", ZERO),
]


def config_gradient(overrides: str, group_size: int = 2) -> torch.Tensor:
    cfg = compose_cfg(*overrides.split(), "beta=1.0" if "none" not in overrides else "beta=0", f"algo.group_size={group_size}")
    return expected_gradient(POLICY, REF, kl_spec(cfg), pg_spec(cfg), group_size)


@pytest.mark.parametrize("overrides,expected", ROWS, ids=[r[0] for r in ROWS])
def test_expected_gradient_matches_theory(overrides, expected):
    got = config_gradient(overrides)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()


def test_targets_are_distinct():
    """The theory rows would be vacuous if the targets coincided on this policy."""
    names = ["reverse_kl", "forward_kl", "context_forward", "token_reverse"]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (T[a] - T[b]).abs().max() > 1e-2, (a, b)
    assert T["reverse_kl"].abs().max() > 1e-2


def test_k3_in_loss_is_not_a_sequence_level_kl_gradient():
    got = config_gradient("estimator=k3 placement=loss")
    assert (got - T["reverse_kl"]).abs().max() > 1e-2
    assert (got - T["forward_kl"]).abs().max() > 1e-2


def test_k1_reward_equals_reverse_kl_with_a_task_reward_present():
    """The KL part is additive: adding a task reward adds exactly the policy gradient of the reward."""
    rewards = torch.arange(27, dtype=torch.float64) % 2
    pg = PGSpec(baseline="rloo")
    with_kl = expected_gradient(POLICY, REF, KLSpec("k1", 1.0, in_reward=True), pg, 2, rewards=rewards)
    reward_only = expected_gradient(POLICY, REF, KLSpec(None), pg, 2, rewards=rewards)
    assert torch.allclose(with_kl - reward_only, T["reverse_kl"], atol=1e-6)


@pytest.mark.parametrize("group_size", [2, 3])
def test_leave_one_out_keeps_reward_kl_unbiased(group_size):
    got = expected_gradient(POLICY, REF, KLSpec("k1", 1.0, in_reward=True), PGSpec(baseline="rloo"), group_size)
    assert torch.allclose(got, T["reverse_kl"], atol=1e-6)


@pytest.mark.parametrize("group_size", [2, 3])
def test_group_mean_including_the_sample_shrinks_by_one_minus_one_over_g(group_size):
    got = expected_gradient(POLICY, REF, KLSpec("k1", 1.0, in_reward=True), PGSpec(baseline="dr_grpo"), group_size)
    assert torch.allclose(got, (1 - 1 / group_size) * T["reverse_kl"], atol=1e-6)


def test_beta_scales_the_kl_gradient_linearly():
    half = expected_gradient(POLICY, REF, KLSpec("k3", 0.5, in_loss=True), PGSpec(), 2)
    assert torch.allclose(half, 0.5 * T["context_forward"], atol=1e-6)


@pytest.mark.parametrize("agg", ["seq_sum", "token_mean", "seq_mean_token_mean"])
def test_micro_batches_reproduce_the_full_batch_gradient(agg):
    """The trainer splits a batch into micro-batches of whole groups; with the global token count the
    accumulated gradient equals the full-batch one, for every aggregation."""
    from klrl.losses import policy_loss

    torch.manual_seed(0)
    B, Tn, G = 8, 5, 4
    mask = (torch.rand(B, Tn) > 0.3).double()
    mask[:, 0] = 1
    logits = torch.randn(B, Tn, requires_grad=True, dtype=torch.float64)
    ref, rewards = torch.randn(B, Tn, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    kl, pg = KLSpec("k3", 0.3, in_reward=True, in_loss=True), PGSpec(baseline="rloo", agg=agg)
    norm = (mask.sum() / B).item()

    full = policy_loss(logits, logits.detach(), ref, mask, rewards, G, pg, kl, token_norm=norm).loss
    (g_full,) = torch.autograd.grad(full, logits)
    total = 0
    for s in (slice(0, 4), slice(4, 8)):
        part = policy_loss(logits[s], logits[s].detach(), ref[s], mask[s], rewards[s], G, pg, kl, token_norm=norm).loss
        total = total + part * 0.5
    (g_parts,) = torch.autograd.grad(total, logits)
    assert torch.allclose(g_full, g_parts, atol=1e-12)
