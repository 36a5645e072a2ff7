"""Generation backends: the hf generator is the old sampling path, rollouts rebuilt from token lists (vLLM's output)
equal hf's, and generation.backend=vllm is refused in one line wherever it cannot run. The vLLM engine itself is
tested by the `gpu` tests at the end (deselected by default: `pytest -m gpu` on a CUDA machine with the extra)."""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

from klrl.config.validate import validate

from klrl.errors import ConfigError
from klrl.paths import install_hint
from klrl.sampling.generation import HFGenerator, logprob_mismatch, make_generator
from klrl.models.registry import load_model
from klrl.sampling.rollout import encode_prompts, generate, response_logits, rollout_from_tokens, token_logprobs
from klrl.tasks import TASKS
from klrl.runs.rundir import comparable

from conftest import FAST, compose_cfg, run_klrl


def same(a, b) -> bool:
    return (a.prompt_len == b.prompt_len and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.response_mask, b.response_mask))


def test_hf_generator_is_the_old_sampling_path_and_is_seeded(tiny):
    cfg, model, tok, prompts = tiny
    gen = make_generator(cfg, model, tok)
    assert isinstance(gen, HFGenerator)
    draws = {}
    for name, seed, fn in (("gen", 3, lambda: gen.generate(prompts, 16, 1.0, 1.0)),
                           ("old", 3, lambda: generate(model, tok, prompts, 16, 1.0, 1.0)),
                           ("again", 3, lambda: gen.generate(prompts, 16, 1.0, 1.0)),
                           ("other", 4, lambda: gen.generate(prompts, 16, 1.0, 1.0))):
        torch.manual_seed(seed)
        draws[name] = fn()
    assert same(draws["gen"], draws["old"]) and same(draws["gen"], draws["again"])
    assert not torch.equal(draws["gen"].input_ids, draws["other"].input_ids)
    assert draws["gen"].sampler_logp is None  # hf reports no engine log-probs: the trainer's are the sampler's
    assert same(gen.generate(prompts, 16, greedy=True), generate(model, tok, prompts, 16, greedy=True))


def test_hf_sampling_ignores_the_checkpoints_generation_defaults(tiny):
    """Penalties and cut-offs from generation_config.json would sample off-policy; the hf backend drops them."""
    cfg, model, tok, prompts = tiny
    plain = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain.append(generate(model, tok, prompts, 16, 1.0, 1.0))
    skewed = copy.deepcopy(model)
    skewed.generation_config.update(repetition_penalty=5.0, top_k=2, min_new_tokens=4)
    for seed, ref in zip((0, 1), plain):
        torch.manual_seed(seed)
        assert same(generate(skewed, tok, prompts, 16, 1.0, 1.0), ref)
    assert skewed.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was
    # What transformers alone does with those defaults: different samples.
    torch.manual_seed(0)
    raw = skewed.generate(input_ids=plain[0].input_ids[:, : plain[0].prompt_len], attention_mask=plain[0].attention_mask[
        :, : plain[0].prompt_len], do_sample=True, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    assert not torch.equal(raw, plain[0].input_ids[:, : raw.shape[1]])


def test_hf_sync_samples_from_the_given_module(tiny):
    """The trainer's snapshot ring syncs the generator to the lagged policy: it must then sample that policy."""
    cfg, model, tok, prompts = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    gen = make_generator(cfg, model, tok)
    gen.sync(other)
    assert same(gen.generate(prompts, 16, greedy=True), generate(other, tok, prompts, 16, greedy=True))
    assert not same(gen.generate(prompts, 16, greedy=True), generate(model, tok, prompts, 16, greedy=True))


def test_rollout_from_tokens_equals_the_hf_rollout(tiny):
    cfg, model, tok, prompts = tiny
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, 3, 1.0, 1.0)  # 3 tokens: some answers end with EOS, others are cut
    ends = ro.response_mask.sum(-1).long()
    stopped = [(ro.responses[i, : ends[i]] == tok.eos_token_id).any().item() for i in range(len(prompts))]
    assert any(stopped) and not all(stopped)
    assert len({len(p) for p in prompts}) > 1  # ragged prompts: the left padding is exercised
    # What an engine returns: each response up to and including its EOS, nothing after.
    responses = [ro.responses[i, : ends[i]].tolist() for i in range(len(prompts))]
    with torch.no_grad():
        lp = token_logprobs(response_logits(model, ro), ro.responses, ro.response_mask)
    logps = [lp[i, : ends[i]].tolist() for i in range(len(prompts))]
    rebuilt = rollout_from_tokens(prompts, responses, tok.pad_token_id, logps)
    assert same(rebuilt, ro)
    torch.testing.assert_close(rebuilt.sampler_logp, lp, rtol=0, atol=0)
    assert logprob_mismatch(rebuilt.sampler_logp, lp, ro.response_mask) == {
        "mismatch/logp_abs_mean": 0.0, "mismatch/logp_abs_max": 0.0, "mismatch/kl_k3": 0.0}
    sub = ro.select(slice(2, 7))
    assert same(rebuilt.select(slice(2, 7)), sub) and rebuilt.select(slice(2, 7)).sampler_logp.shape == sub.response_mask.shape


def test_logprob_mismatch_values():
    engine = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    d = torch.tensor([-0.5, 0.0, 0.0, -0.2])  # trainer - engine on the four real tokens
    m = logprob_mismatch(engine, trainer, mask)
    assert m["mismatch/logp_abs_mean"] == pytest.approx(0.175)
    assert m["mismatch/logp_abs_max"] == pytest.approx(0.5)
    assert m["mismatch/kl_k3"] == pytest.approx((torch.exp(d) - 1 - d).mean().item())


@pytest.mark.parametrize("knob", ["gpu_memory_utilization=0.5", "enforce_eager=false", "max_model_len=256"])
def test_vllm_knobs_are_refused_with_hf(knob):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(f"generation.vllm.{knob}"))
    key, value = knob.split("=")
    assert str(e.value).startswith(f"generation.vllm.{key}=")
    assert "has no effect with generation.backend=hf; it needs generation.backend=vllm" in str(e.value)


def test_unset_vllm_knobs_leave_the_run_config_as_before():
    """Runs made before the vllm backend have no generation.vllm: resuming them must not see a config change."""
    assert "vllm" not in comparable(compose_cfg())["generation"]
    assert comparable(compose_cfg("generation.backend=vllm", "generation.vllm.enforce_eager=true"))["generation"][
        "vllm"]["enforce_eager"] is True


def _one_line_refusal(proc, message):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klrl: ") and message in lines[0], proc.stderr


def test_vllm_is_refused_where_it_is_not_installed(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")  # the refusal under test only exists where it is not
    proc = run_klrl("train", "generation.backend=vllm", cwd=tmp_path)
    _one_line_refusal(proc, "generation.backend=vllm but vLLM is not installed here; install the extra "
                            f"({install_hint('vllm')}, on a machine with a CUDA GPU) or use generation.backend=hf")
    assert not (tmp_path / "outputs").exists()


def test_vllm_is_refused_without_a_gpu(tmp_path):
    """vLLM importable (a bare package on the path) but no CUDA device visible: refused before any model is built."""
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("raise ImportError('klrl must not import vllm here')\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "klrl", "train", "generation.backend=vllm"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    _one_line_refusal(proc, "generation.backend=vllm needs a CUDA GPU and none is visible here; use generation.backend=hf")
    assert not (tmp_path / "outputs").exists()


def test_vllm_config_checks_where_vllm_could_run(monkeypatch):
    """The checks after availability, with availability granted (as on a GPU machine with the extra)."""
    import klrl.config.schema

    monkeypatch.setattr(klrl.config.schema, "vllm_unavailable", lambda: None)
    validate(compose_cfg("generation.backend=vllm", "generation.vllm.gpu_memory_utilization=0.3",
                         "generation.vllm.enforce_eager=true", "generation.vllm.max_model_len=128"))
    for overrides, message in (
        (["async_mode=pipeline", "async_level=1", "algo.is_truncate=8"],
         "generation.backend=vllm does not run with async_mode=pipeline; use async_mode=sim"),
        (["generation.vllm.gpu_memory_utilization=1.5"], "generation.vllm.gpu_memory_utilization=1.5 is not valid; it must be a finite number > 0 and < 1"),
        (["generation.vllm.max_model_len=0"], "generation.vllm.max_model_len=0 is not valid; it must be an integer >= 1"),
        (["model.fsdp=true"], "generation.backend=vllm does not run with model.fsdp=true yet"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(compose_cfg("generation.backend=vllm", *overrides))


# ---- the vLLM engine: CUDA + the vllm extra; deselected by default, run with `pytest -m gpu` ----

GPU = [*FAST, "generation.backend=vllm", "device=cuda", "model.hidden_size=128", "model.num_heads=2",
       "generation.vllm.gpu_memory_utilization=0.3"]  # head size 64: one every attention backend supports


@pytest.fixture(scope="module")
def engine():
    cfg = compose_cfg(*GPU)
    validate(cfg)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    model, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    model.to("cuda").eval()
    prompts = encode_prompts(tok, [p.prompt for p in task.sample_train(random.Random(0), 64)], False)
    gen = make_generator(cfg, model, tok)
    yield cfg, model, tok, prompts, gen
    gen.close()


@pytest.mark.gpu
def test_vllm_greedy_matches_hf_greedy(engine):
    cfg, model, tok, prompts, gen = engine
    v = gen.generate(prompts, cfg.task.max_new_tokens, greedy=True)
    h = generate(model, tok, prompts, cfg.task.max_new_tokens, greedy=True)
    assert v.prompt_len == h.prompt_len
    real_v = [v.responses[i][v.response_mask[i] > 0].tolist() for i in range(len(prompts))]
    real_h = [h.responses[i][h.response_mask[i].cpu() > 0].tolist() for i in range(len(prompts))]
    agree = sum(a == b for a, b in zip(real_v, real_h)) / len(prompts)
    assert agree >= 0.95, agree  # float32 on both sides; a near-tie may flip the odd argmax


@pytest.mark.gpu
def test_vllm_samples_are_seeded_and_its_logprobs_are_the_trainers(engine):
    cfg, model, tok, prompts, gen = engine
    torch.manual_seed(0)
    a = gen.generate(prompts, cfg.task.max_new_tokens, 1.0, 1.0)
    torch.manual_seed(0)
    b = gen.generate(prompts, cfg.task.max_new_tokens, 1.0, 1.0)
    assert same(a, b)
    with torch.no_grad():
        ours = token_logprobs(response_logits(model, a), a.responses, a.response_mask).cpu()
    m = logprob_mismatch(a.sampler_logp, ours, a.response_mask)
    assert m["mismatch/logp_abs_max"] < 1e-2, m


@pytest.mark.gpu
def test_vllm_sync_loads_the_trainers_new_weights(engine):
    cfg, model, tok, prompts, gen = engine
    before = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen.sync(model)
    torch.manual_seed(1)
    ro = gen.generate(prompts, cfg.task.max_new_tokens, 1.0, 1.0)
    with torch.no_grad():
        new = token_logprobs(response_logits(model, ro), ro.responses, ro.response_mask).cpu()
        old = token_logprobs(response_logits(before, ro), ro.responses, ro.response_mask).cpu()
    assert logprob_mismatch(ro.sampler_logp, new, ro.response_mask)["mismatch/logp_abs_max"] < 1e-2
    assert logprob_mismatch(ro.sampler_logp, old, ro.response_mask)["mismatch/logp_abs_max"] > 1e-1


@pytest.mark.gpu
@pytest.mark.parametrize("lag", [[], ["async_level=1", "algo.is_truncate=8"]], ids=["on-policy", "lag-1"])
def test_train_with_vllm(tmp_path, lag):
    from klrl.runs.rundir import read_metrics
    from klrl.training.trainer import train

    assert train(compose_cfg(*GPU, "steps=2", *lag), tmp_path) == "completed"
    recs = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(recs) == 2 and all(r["mismatch/logp_abs_max"] < 1e-2 for r in recs)
