"""Exact expected gradients of the real training loss, for every KL configuration.

Each configuration is composed from the same Hydra config the trainer uses and turned into the loss by the same
`kl_spec`/`pg_spec`; `klrl.core.toy.expected_gradient` then weights the real `policy_loss` gradient of every possible
group of G sampled responses by its probability. Targets are exact gradients of divergences.

Two kinds of test: `THEORY` states the paper's derivations (arXiv 2512.21852 §3; Tang & Munos 2025) as identities
between exact gradients, independent of klrl's verdict code; the matrix below it runs every configuration of every
registered estimator (`klrl.audit.configs.all_configs`) through the one verdict function and checks that the verdict
is a property of the configuration, not of the toy it was computed on. A new estimator joins the matrix by itself.
"""

from __future__ import annotations

import pytest
import torch

from klrl.audit.configs import all_configs
from klrl.audit.verdicts import DEFAULT_TOY, Toy, verdict
from klrl.config.specs import kl_spec, pg_spec
from klrl.core.distributions import Sampling
from klrl.core.estimators import kl_values
from klrl.core.losses import KLSpec, PGSpec, policy_loss
from klrl.core.toy import TabularPolicy, exact_targets, expected_gradient

from conftest import compose_cfg

POLICY = TabularPolicy(vocab=3, length=3, seed=0)
REF = TabularPolicy(vocab=3, length=3, seed=1)
T = exact_targets(POLICY, REF)
ZERO = torch.zeros_like(T["reverse_kl"])

# The theory (command-line overrides, expected gradient of the KL part of the loss divided by beta).
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
    # the framework presets' weights: on-policy, rho = 1 and the score weight exp(l - sg l) = 1 in value
    ("estimator=k1 placement=loss placement.loss_weight=score", T["token_reverse"]),  # (delta + 1) grad l
    ("estimator=k3 placement=loss placement.loss_weight=score", T["token_reverse"]),  # grad of sum_t E_pi[k3_t]
    ("estimator=k1 placement=loss placement.loss_weight=detached_rho", T["token_reverse"]),  # sg(delta) grad l
    ("estimator=k2 placement=loss placement.loss_weight=detached_rho", T["token_reverse"]),
    ("estimator=k3 placement=loss placement.loss_weight=detached_rho", T["token_reverse"]),
    ("estimator=k1 placement=reward placement.reward_logp=old", T["reverse_kl"]),  # old = current on-policy
    ("estimator=k3 placement=loss placement.loss_agg=seq_sum algo.agg=token_mean", T["context_forward"]),
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


@pytest.mark.parametrize("agg", ["seq_sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_reproduce_the_full_batch_gradient(agg):
    """The trainer splits a batch into micro-batches of whole groups; with the global token count the
    accumulated gradient equals the full-batch one, for every aggregation."""
    from klrl.core.losses import policy_loss

    torch.manual_seed(0)
    B, Tn, G = 8, 5, 4
    mask = (torch.rand(B, Tn) > 0.3).double()
    mask[:, 0] = 1
    logits = torch.randn(B, Tn, requires_grad=True, dtype=torch.float64)
    ref, rewards = torch.randn(B, Tn, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    kl, pg = KLSpec("k3", 0.3, in_reward=True, in_loss=True), PGSpec(baseline="rloo", agg=agg, agg_norm=5.0)
    norm = (mask.sum() / B).item()

    full = policy_loss(logits, logits.detach(), ref, mask, rewards, G, pg, kl, token_norm=norm).loss
    (g_full,) = torch.autograd.grad(full, logits)
    total = 0
    for s in (slice(0, 4), slice(4, 8)):
        part = policy_loss(logits[s], logits[s].detach(), ref[s], mask[s], rewards[s], G, pg, kl, token_norm=norm).loss
        total = total + part * 0.5
    (g_parts,) = torch.autograd.grad(total, logits)
    assert torch.allclose(g_full, g_parts, atol=1e-12)


# --- every configuration of every registered estimator, through the one verdict function -------------------------

ALGOS = {"rloo": PGSpec("rloo"), "grpo": PGSpec("grpo", agg="seq_mean_token_mean"),
         "dr_grpo": PGSpec("dr_grpo", agg="seq_mean_token_sum_norm", agg_norm=3.0)}
OTHER_TOYS = [Toy(seed=7), Toy(kind="transformer", seed=1)]


def matrix() -> dict[str, KLSpec]:
    """Every configuration of every registered estimator x every algo preset: the test matrix, generated."""
    return {f"{c.name}|{algo}": c.spec for c in all_configs(0.5) for algo in ALGOS}


def check_row(spec: KLSpec, algo: str) -> None:
    """The verdict (which exact combination of divergence gradients, if any) is the same on another random
    tabular policy and on a transformer, so it is a property of the configuration; where it is a scaled named
    direction the scale is too (it belongs to G and the generation budget, not to the policy)."""
    v = verdict(spec, ALGOS[algo])
    assert v.label, v
    for toy in OTHER_TOYS if algo == "rloo" else OTHER_TOYS[:1]:  # the transformer is slow: one algo suffices
        w = verdict(spec, ALGOS[algo], toy=toy)
        assert w.label == v.label, (toy, w.text, v.text)
        if v.scale is not None:
            assert w.scale == pytest.approx(v.scale, rel=1e-4), toy


MATRIX = matrix()


@pytest.mark.parametrize("row", list(MATRIX))
def test_verdict_is_a_property_of_the_configuration(row):
    check_row(MATRIX[row], row.split("|")[1])


SPECS = {c.name: c.spec for c in all_configs(0.5)}


def test_verdicts_hold_at_every_sampling_temperature_and_top_p():
    """The sampled distribution is what is trained: the theory holds for it at any (T, p)."""
    for sampling in (Sampling(0.7, 1.0), Sampling(1.0, 0.9), Sampling(0.7, 0.9), Sampling(1.3, 0.8)):
        for name, label in (("k1-reward", "unbiased"), ("k1-loss", "zero in expectation"),
                            ("k3-loss", "per-context forward KL"), ("k3-both", "unbiased"),
                            ("k3-reward", "reverse minus per-context forward KL"),
                            ("k2-loss", "token-level partial gradient")):
            assert verdict(SPECS[name], PGSpec(), sampling).label == label, (sampling, name)


def test_dr_grpo_scale_is_one_minus_one_over_g_over_the_budget():
    """Dr. GRPO's constant normaliser keeps the direction of k1-in-reward; the group mean shrinks it by
    (1 - 1/G) and the budget divides it: (1 - 1/G) / L, exactly, whatever the response lengths."""
    for G, L in ((2, 3), (3, 2)):
        toy = Toy(length=L, group_size=G)
        v = verdict(SPECS["k1-reward"], PGSpec("dr_grpo", agg="seq_mean_token_sum_norm", agg_norm=L), toy=toy)
        assert v.label == "scaled" and v.scale == pytest.approx((1 - 1 / G) / L, abs=1e-6)


def test_token_mean_with_variable_lengths_bends_the_direction():
    """Dividing by the batch's own token count (token_mean) or each response's (seq_mean_token_mean) weights
    responses by their length: with an EOS the direction of k1-in-reward moves off grad KL; with every response
    of length L, token_mean only divides it by L."""
    for agg in ("token_mean", "seq_mean_token_mean"):
        v = verdict(SPECS["k1-reward"], PGSpec("rloo", agg=agg))
        assert v.parts is None and 0.9 < v.cos_rev < 0.9999 and v.residual > 1e-3, (agg, v.text)
    v = verdict(SPECS["k1-reward"], PGSpec("rloo", agg="token_mean"), toy=Toy(eos=False))
    assert v.label == "scaled" and v.scale == pytest.approx(1 / DEFAULT_TOY.length, abs=1e-6)


def test_grpo_std_makes_the_reward_kl_nearly_independent_of_beta():
    """Task rewards tied within groups: the group std rescales the penalty, so the total KL gradient's size hardly
    moves with beta; in the loss it is linear in beta."""
    pg = PGSpec("grpo", agg="seq_mean_token_mean")
    for name, linear in (("k1-reward", False), ("k3-loss", True)):
        fits = []
        for beta in (1.0, 0.1, 0.01):
            spec = all_configs(beta)[[c.name for c in all_configs(beta)].index(name)].spec
            fits.append(verdict(spec, pg).fit * beta)
        if linear:
            assert fits[1] == pytest.approx(fits[0] / 10, rel=1e-6)
        else:
            assert fits[2] == pytest.approx(fits[0], rel=0.02), fits


# --- clamps, as the frameworks apply them ------------------------------------------------------------------------

def test_verl_low_var_kl_values_and_gradients():
    """verl's low_var_kl: kl = ref - logp clamped to +-20, ratio = exp(kl), value = ratio - kl - 1 clamped to +-10."""
    delta = torch.tensor([-5.0, 15.0, 0.3, -30.0], dtype=torch.float64, requires_grad=True)
    k = kl_values(delta, "k3", clamp_log_ratio=20, clamp_value=10)
    (g,) = torch.autograd.grad(k.sum(), delta)
    kl = (-delta.detach()).clamp(-20, 20)
    expected = (kl.exp() - kl - 1).clamp(-10, 10)
    assert torch.allclose(k.detach(), expected, atol=1e-12)
    assert k[0].item() == 10 and g[0].item() == 0  # delta = -5: e^5 - 5 - 1 = 142.4 -> 10, gradient 0
    assert k[1].item() == 10 and g[1].item() == 0  # delta = 15: 14.0 -> 10
    assert g[2].item() == pytest.approx(1 - torch.exp(torch.tensor(-0.3, dtype=torch.float64)).item())


def test_straight_through_clamps_bite_the_value_only():
    """verl's k3+: the clamped k3 value, the unclamped k2 gradient."""
    delta = torch.tensor([-5.0, 15.0, 0.3], dtype=torch.float64, requires_grad=True)
    k = kl_values(delta, "k3+", clamp_log_ratio=20, clamp_value=10)
    (g,) = torch.autograd.grad(k.sum(), delta)
    assert torch.allclose(k.detach(), kl_values(delta.detach(), "k3", 20, 10))
    assert torch.allclose(g, delta.detach())  # d(delta^2 / 2) / d delta


def test_padding_never_reaches_the_estimator():
    """policy_loss masks delta before the estimator: a huge |delta| at padding gives a finite loss and the same
    gradient as delta = 0 there, for every estimator and placement."""
    torch.manual_seed(0)
    B, T, G = 4, 5, 2
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[:, 3:] = 0
    logp = torch.randn(B, T, dtype=torch.float64) * 0.1 - 1
    ref = logp + torch.randn(B, T, dtype=torch.float64) * 0.1
    rewards = torch.rand(B, dtype=torch.float64)
    for c in all_configs(0.3):
        grads = []
        for pad in (-1e4, 0.0):
            lp = logp.clone()
            lp[mask == 0] = pad
            lp.requires_grad_(True)
            out = policy_loss(lp, lp.detach(), ref, mask, rewards, G, PGSpec(), c.spec)
            assert torch.isfinite(out.loss), c.name
            (g,) = torch.autograd.grad(out.loss, lp)
            grads.append(g)
        assert torch.allclose(grads[0], grads[1], atol=1e-12), c.name
