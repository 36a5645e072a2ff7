"""Framework presets (conf/preset/): each one's real loss, composed from its Hydra config, equals an independent
oracle of the framework's documented formula (tests/framework_oracles.py) on random inputs with extreme log-ratios;
each preset's exact-gradient verdict comes from the verdict function; each one trains and is audited by the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from klrl.audit.verdicts import DEFAULT_TOY, Toy, verdict
from klrl.cli.audit import FRAMEWORKS, framework_table, off_policy_config, preset_names, preset_row
from klrl.cli.compose import preset_departures
from klrl.config.specs import kl_spec, pg_spec, sampling_spec
from klrl.config.validate import validate
from klrl.core.losses import kl_terms, policy_loss, reward_to_go
from klrl.core.toy import TabularPolicy, exact_targets, expected_gradient
from klrl.errors import ConfigError
from klrl.paths import CONF_DIR
from klrl.runs.rundir import SUMMARY, read_json, read_metrics
from klrl.training.trainer import train

from conftest import FAST, compose_cfg, run_klrl
from framework_oracles import DEFAULT_BETA, ORACLES

PRESETS = preset_names()
F64 = torch.float64
DOC = Path(__file__).resolve().parent.parent / "docs/frameworks.md"
BLOCK = re.compile(r"<!-- BEGIN klrl audit --frameworks -->\n(.*?)\n<!-- END klrl audit --frameworks -->", re.S)
# Log-ratios log(pi/pi_ref) where the frameworks' clamps bite: value +-10 (k3 > 10 from delta ~ -2.4 and ~ 11), log
# ratio +-20 (verl, NeMo-RL, SkyRL) and +-40 (open-instruct), scaled by the preset's largest |delta| below.
EXTREMES = torch.tensor([-1.0, -0.85, -0.7, -0.4, -0.17, -0.08, 0.08, 0.17, 0.37, 0.5, 0.7, 0.85, 1.0], dtype=F64)
# An unclamped differentiable ratio times k3 (rho_t k3_t) has the gradient rho_t delta_t, which both codes compute
# as rho (k3 + 1 - r): two O(e^-delta) terms cancel, losing ~13 of float64's 16 digits at delta = -30. Up to |delta|
# = 20 they keep 8, enough to tell two implementations apart.
MAX_DELTA = {"trl_grpo_bias_corrected": 20.0, "deepseek_v32": 20.0}
# Off-policy, TRL's RLOOTrainer clips a sequence-level ratio and klrl a token-level one (the preset's `differs`).
OFF_POLICY_DIFFERS = {"trl_rloo"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest)


def test_every_preset_has_an_oracle_and_provenance():
    assert sorted(PRESETS) == sorted(ORACLES)
    for name in PRESETS:
        text = (Path(CONF_DIR) / "preset" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        meta = OmegaConf.load(Path(CONF_DIR) / "preset" / f"{name}.yaml").preset
        assert meta.name == name and meta.framework in FRAMEWORKS and meta.setting, name
        assert meta.source.startswith("https://"), name
        # the version read: a commit of the framework's repository, or the paper's arXiv id
        assert re.search(r"@[0-9a-f]{7}|/blob/[0-9a-f]{40}/|arXiv \d{4}\.\d{5}", text), name
        cfg = compose_cfg(f"preset={name}")
        # the framework's own default coefficient (0: KL off by default, or unpublished; none where the KL is inert)
        if DEFAULT_BETA[name] > 0 and cfg.estimator.name != "none":
            assert cfg.beta == pytest.approx(DEFAULT_BETA[name]), name


def batch(seed: int, off_policy: bool, max_delta: float):
    """Three groups of four responses of up to six tokens (variable lengths), log-ratios N(0, 1) plus the EXTREMES
    on real tokens, padding holding wild log-probs; off-policy, log(pi/pi_old) N(0, 0.3) plus +-22 on two tokens."""
    g = torch.Generator().manual_seed(seed)
    B, T, G = 12, 6, 4
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    real = mask.view(-1).nonzero().view(-1)
    picks = real[torch.randperm(len(real), generator=g)]
    base = -3 * torch.rand(B, T, generator=g, dtype=F64)
    delta = torch.randn(B, T, generator=g, dtype=F64)
    delta.view(-1)[picks[: len(EXTREMES)]] = EXTREMES * max_delta
    old = base.clone()
    if off_policy:
        old -= 0.3 * torch.randn(B, T, generator=g, dtype=F64)
        old.view(-1)[picks[len(EXTREMES): len(EXTREMES) + 2]] = base.view(-1)[picks[len(EXTREMES): len(EXTREMES) + 2]] \
            + torch.tensor([22.0, -22.0], dtype=F64)
    ref = base - delta
    logp, pad = base.clone(), mask == 0
    logp[pad], ref[pad], old[pad] = 50.0, -1e4, 1e3
    rewards = torch.rand(B, generator=g, dtype=F64)
    return logp, old, ref, mask, rewards, G


def klrl_values(cfg, logp, old, ref, mask, rewards, G):
    """klrl's per-token KL values for the preset, through the loss's own kl_terms: the in-loss term, or the reward
    penalty recovered from what the baseline sees (seqsum) or from the per-token shift (togo)."""
    kl = kl_spec(cfg)
    real = mask > 0
    log_rho = torch.where(real, logp - old, torch.zeros_like(logp))
    out = kl_terms(logp, old, ref, real, log_rho, torch.exp(log_rho), rewards, G, kl)
    if kl.estimator is None:
        return out.in_loss, "loss"
    if kl.in_loss:
        return out.in_loss / kl.beta, "loss"
    if kl.reward_form == "togo":
        return out.token_shift / kl.beta, "togo"
    return (rewards - out.rewards) / kl.beta, "seqsum"


def compare(name: str, off_policy: bool, seed: int):
    cfg = compose_cfg(f"preset={name}")
    if off_policy:
        cfg = off_policy_config([f"preset={name}"], cfg)
    logp, old, ref, mask, rewards, G = batch(seed, off_policy, MAX_DELTA.get(name, 30.0))
    if not off_policy:
        old = logp.clone()
    x = logp.clone().requires_grad_(True)
    got = policy_loss(x, old, ref, mask, rewards, G, pg_spec(cfg), kl_spec(cfg))
    (g_klrl,) = torch.autograd.grad(got.loss, x)
    y = logp.clone().requires_grad_(True)
    want = ORACLES[name](y, old, ref, mask, rewards, G, float(cfg.beta))
    (g_oracle,) = torch.autograd.grad(want["loss"], y)
    values, form = klrl_values(cfg, logp, old, ref, mask, rewards, G)
    expected = {"loss": want["per_token_kl"], "togo": reward_to_go(want["per_token_kl"]),
                "seqsum": want["per_token_kl"].sum(-1)}[form]
    return g_klrl, g_oracle, values.detach(), expected


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", PRESETS)
def test_preset_equals_its_oracle_on_policy(name, seed):
    g_klrl, g_oracle, values, expected = compare(name, False, seed)
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(g_klrl).all()
    torch.testing.assert_close(g_klrl, g_oracle, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_equals_its_oracle_off_policy(name):
    """With the framework's off-policy knobs (`preset.off_policy`: PPO clip, dual clip, ratio log-clamp) and
    log(pi/pi_old) up to +-22: equal, except where the preset says klrl differs, where the difference is real."""
    g_klrl, g_oracle, values, expected = compare(name, True, 2)
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-12)
    if name in OFF_POLICY_DIFFERS:
        assert compose_cfg(f"preset={name}").preset.differs
        assert not torch.allclose(g_klrl, g_oracle, rtol=1e-3, atol=1e-9)
    else:
        torch.testing.assert_close(g_klrl, g_oracle, rtol=1e-8, atol=1e-12)


def test_the_extremes_reach_the_clamps():
    """The oracle comparisons would not test the clamps if none bit: on their seed-0 batch verl's low_var_kl value
    sits at its +-10 clamp on several tokens, with no KL gradient there, while k3+ keeps the gradient delta_t."""
    logp, old, ref, mask, rewards, G = batch(0, False, 30.0)
    grads = {}
    for name in ("verl_grpo_kl_loss", "verl_k3plus"):
        cfg = compose_cfg(f"preset={name}")
        x = logp.clone().requires_grad_(True)
        zero = torch.zeros_like(rewards)  # tied task rewards: GRPO's advantages vanish, the KL term is all there is
        (grads[name],) = torch.autograd.grad(policy_loss(x, x.detach(), ref, mask, zero, G, pg_spec(cfg),
                                                         kl_spec(cfg)).loss, x)
    clamped = (klrl_values(compose_cfg("preset=verl_grpo_kl_loss"), logp, logp, ref, mask, rewards, G)[0] == 10)
    assert clamped.sum() >= 6
    assert (grads["verl_grpo_kl_loss"][clamped] == 0).all() and (grads["verl_k3plus"][clamped] != 0).all()


# --- the verdicts, from the one verdict function -----------------------------------------------------------------

POLICY, REF = TabularPolicy(vocab=3, length=3, seed=0), TabularPolicy(vocab=3, length=3, seed=1)
EXACT = exact_targets(POLICY, REF)
# Theory (docs/frameworks.md), stated as exact gradients on a toy whose responses all have 3 tokens (a token mean
# then divides by 3), per unit beta, task reward 0: which divergence's gradient each preset's KL follows on-policy.
THEORY = {
    "context_forward": ["verl_grpo_kl_loss", "trl_grpo", "openrlhf_kl_loss", "open_instruct_k3", "slime_kl_loss",
                        "skyrl_default"],  # k3 in the loss, its pathwise term: sum_t (1 - r_t) grad l_t
    "token_reverse": ["verl_k3plus", "trl_grpo_bias_corrected", "openrlhf_unbiased", "open_instruct_is_k1",
                      "slime_unbiased_kl", "nemo_rl_default", "deepseek_v32"],  # sum_t delta_t grad l_t (k2's)
    "reverse_kl": ["trl_rloo", "openrlhf_kl_reward"],  # k1 in the reward (seqsum with RLOO, or reward-to-go)
}
SCALE = {"trl_rloo": 1.0}  # seq_sum; every other listed preset divides by the 3 tokens


@pytest.mark.parametrize("target,name", [(t, n) for t, names in THEORY.items() for n in names])
def test_preset_kl_gradient_matches_theory(target, name):
    cfg = compose_cfg(f"preset={name}", "algo.group_size=2")
    got = expected_gradient(POLICY, REF, kl_spec(cfg), pg_spec(cfg, budget=3), 2) / cfg.beta
    torch.testing.assert_close(got, SCALE.get(name, 1 / 3) * EXACT[target], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_verdict_is_a_property_of_the_configuration(name):
    """On- and off-policy (with the framework's own clip), the verdict is the same on another random policy, and
    the framework table shows what the verdict function says."""
    cfg = compose_cfg(f"preset={name}")
    off = off_policy_config([f"preset={name}"], cfg)
    for c, off_policy in ((cfg, False), (off, True)):
        kl, pg, s = kl_spec(c), pg_spec(c, budget=DEFAULT_TOY.length), sampling_spec(c)
        v, w = verdict(kl, pg, s, off_policy), verdict(kl, pg, s, off_policy, Toy(seed=7))
        assert v.label == w.label, (off_policy, v.text, w.text)
    row = preset_row([f"preset={name}"], cfg, DEFAULT_TOY)
    assert row["on_policy"] == verdict(kl_spec(cfg), pg_spec(cfg, budget=3), sampling_spec(cfg), False)
    assert row["off_policy"] == verdict(kl_spec(off), pg_spec(off, budget=3), sampling_spec(off), True)


def test_the_framework_table_in_the_docs_is_the_audits():
    found = BLOCK.search(DOC.read_text())
    assert found, "docs/frameworks.md lacks the generated block; paste `klrl audit --markdown`'s framework table"
    table = framework_table()
    assert found.group(1) == table, "docs/frameworks.md's framework table is stale: regenerate it"
    for name in PRESETS:
        row = preset_row([f"preset={name}"], compose_cfg(f"preset={name}"), DEFAULT_TOY)
        line = next(r for r in table.splitlines() if f"`preset={name}`" in r)
        assert f"| {row['on_policy'].short} " in line and f"| {row['off_policy'].short} " in line, name


# --- the CLI ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains(name, tmp_path):
    cfg = compose_cfg(*FAST, "steps=2", "eval.at_start=false", f"preset={name}")
    assert train(cfg, tmp_path) == "completed"
    records = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and all(r["grad_norm"] == r["grad_norm"] for r in records)
    assert read_json(tmp_path / SUMMARY)["status"] == "completed"


def test_klrl_train_preset_names_its_run_and_command_line_overrides_win(tmp_path):
    proc = run_klrl("train", "preset=slime_unbiased_kl", "beta=0.02", *FAST, "steps=1", "eval.at_start=false",
                    cwd=tmp_path, check=True)
    assert "warning: preset" not in proc.stderr  # beta is the user's to tune: still the framework's setting
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*preset=slime_unbiased_kl*")
    stored = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert stored.preset.name == "slime_unbiased_kl" and stored.beta == 0.02
    assert stored.estimator.clamp_after_weight and stored.placement.loss_is_weight


def test_command_line_choices_override_the_preset():
    """The preset comes after the estimator, placement and algo choices (conf/train.yaml), the command line after it:
    a group or a key given there wins, and the preset's other knobs stay."""
    cfg = compose_cfg("preset=verl_grpo_kl_loss", "estimator=k2", "algo=rloo", "algo.agg=seq_sum", "beta=0.5")
    assert (cfg.estimator.name, cfg.algo.name, cfg.algo.agg, cfg.beta) == ("k2", "rloo", "seq_sum", 0.5)
    assert cfg.estimator.clamp_value == 10 and cfg.preset.name == "verl_grpo_kl_loss"
    validate(cfg)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_alone_or_with_batch_and_beta_changes_is_its_framework_setting(name):
    assert preset_departures(compose_cfg(f"preset={name}")) == []
    assert preset_departures(compose_cfg(f"preset={name}", "beta=0.3", "algo.group_size=4", "optim.lr=1e-3")) == []


def test_a_change_to_what_a_preset_sets_is_named():
    """Group options, any estimator or placement key, and the keys the preset's YAML sets (algo.agg) depart from the
    framework's setting; each is named with the preset's value first."""
    assert preset_departures(compose_cfg("preset=trl_grpo", "placement=reward")) == ["placement: 'loss' -> 'reward'"]
    assert preset_departures(compose_cfg("preset=trl_grpo", "algo.agg=seq_mean_token_mean")) == [
        "algo.agg: 'token_mean' -> 'seq_mean_token_mean'"]
    assert preset_departures(compose_cfg("preset=verl_k3plus", "estimator.clamp_value=5")) == [
        "estimator.clamp_value: 10.0 -> 5.0"]
    assert preset_departures(compose_cfg("preset=trl_grpo", "estimator.clamp_value=5")) == [
        "estimator.clamp_value: None -> 5.0"]  # a knob the preset leaves off is part of its setting too
    assert preset_departures(compose_cfg("estimator=k3", "placement=reward")) == []  # no preset, nothing to depart


def test_klrl_train_and_audit_say_when_a_preset_was_changed(tmp_path, capsys):
    proc = run_klrl("train", "preset=trl_grpo", "placement=reward", "--cfg", "job", cwd=tmp_path, check=True)
    assert proc.stderr.strip().splitlines() == [
        "klrl: warning: preset=trl_grpo with changes (placement: 'loss' -> 'reward'): not TRL's setting any more, and "
        "maybe not its gradient; `klrl audit` with the same overrides gives the gradient this config trains with"]
    assert "placement:\n  name: reward" in proc.stdout  # the config is shown as given: a warning, not a refusal
    assert "warning" not in run_klrl("train", "preset=trl_grpo", "--cfg", "job", cwd=tmp_path, check=True).stderr
    from klrl.cli.audit import main as audit_main

    audit_main(["preset=trl_grpo", "placement=reward", "--policy", "tabular", "--sweep-lengths", "none"])
    assert "changed from the preset here: placement: 'loss' -> 'reward': the gradient above is this config's, not " \
           "TRL's own" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["verl_kl_in_reward", "nemo_rl_default", "nemo_rl_grpo_kl_in_reward"])
def test_klrl_audit_preset_reports_its_verdicts(name, capsys):
    from klrl.cli.audit import main as audit_main

    audit_main([f"preset={name}", "--policy", "tabular", "--sweep-lengths", "none"])
    out = capsys.readouterr().out
    row = preset_row([f"preset={name}"], compose_cfg(f"preset={name}"), DEFAULT_TOY)
    assert f"preset={name}: {row['framework']}" in out
    assert f"on-policy:  {row['on_policy'].text}" in out and f"off-policy: {row['off_policy'].text}" in out


def test_an_unknown_preset_is_refused_in_one_line_listing_the_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        compose_cfg("preset=verl_grpo")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in PRESETS)
    proc = run_klrl("train", "preset=verl_grpo", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "preset='verl_grpo' is not valid; choose from:" in proc.stderr and "verl_grpo_kl_loss" in proc.stderr
    assert not (tmp_path / "outputs").exists()
