"""`klrl audit --mc`: compose a model from conf/train.yaml, move pi a seeded step away from pi_ref, run the test.

pi_ref is the configured model as loaded (for `tiny`, the warm-started checkpoint); pi is a copy whose every weight
tensor gets seeded Gaussian noise of `--noise` times its own RMS. That is cheaper and more reproducible than a few RL
steps. The default 0.05 gives the warm-started tiny model a KL(pi||pi_ref) of ~0.13 nats per response, where the
configurations' gradients differ clearly; much closer and every estimator agrees with k1-reward to first order.
"""

from __future__ import annotations

import copy
import random
import sys

import torch

from klrl.errors import AuditError


def compose(overrides: list[str]):
    from klrl.cli.compose import compose as compose_config

    return compose_config(overrides)


def perturb(model, noise: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            eps = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.add_(noise * p.pow(2).mean().sqrt() * eps)


def kl_estimate(sampler, n: int) -> dict:
    """KL(pi||pi_ref) per response from n fresh batches (the k1 estimate, unbiased), with a 95% CI."""
    from klrl.audit.mc import mean_ci

    with torch.no_grad():
        vals = [((b.logp - b.ref) * b.mask).sum(-1) for b in (sampler.draw() for _ in range(n))]
    mean, ci = mean_ci(torch.cat(vals).double().cpu())
    return {"mean": mean, "ci": ci, "samples": sum(len(v) for v in vals)}


def _progress(i: int, n: int) -> None:
    if i == n or i % max(1, n // 10) == 0:
        print(f"  {i}/{n} batches", file=sys.stderr, flush=True)


def run_mc(a, configs) -> dict:
    from klrl.audit import report
    from klrl.audit.configs import select
    from klrl.audit.mc import ModelSampler, mc_audit
    from klrl.config.specs import pg_spec, sampling_spec
    from klrl.models.registry import load_model
    from klrl.sampling.rollout import encode_prompts
    from klrl.tasks import TASKS

    cfg = compose(a.overrides)
    G = cfg.algo.group_size
    if G < 2:
        raise AuditError(f"algo.group_size={G}: the audit needs groups of >= 2")
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    ref, tok = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    ref = ref.to(device).eval().requires_grad_(False)
    if device.type == "cpu" and sum(p.numel() for p in ref.parameters()) < 10**7:
        torch.set_num_threads(1)  # a small model is many tiny ops: threads only add synchronisation (see cli.main)
    policy = copy.deepcopy(ref).requires_grad_(True)
    perturb(policy, a.noise, cfg.seed)
    problem = task.sample_train(random.Random(cfg.seed), 1)[0]
    prompt_ids = encode_prompts(tok, [problem.prompt], cfg.model.chat_template)[0]
    sampler = ModelSampler(policy, ref, tok, prompt_ids, G, cfg.task.max_new_tokens, sampling_spec(cfg))
    if "k1-reward" not in [c.name for c in configs]:  # the reference every configuration is tested against
        configs = select(["k1-reward"], configs[0].spec.beta) + configs
    specs = {c.name: c.spec for c in configs}
    pg = pg_spec(cfg)
    print(f"model {cfg.model.name}, prompt {problem.prompt!r}, G={G}, baseline {pg.baseline}, agg {pg.agg}, "
          f"noise {a.noise}, device {device}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    res = mc_audit(sampler, specs, pg, a.batches, a.pilot, seed=cfg.seed, progress=_progress)
    res.pop("basis")
    res.pop("z")
    res["kl_pi_ref"] = kl_estimate(sampler, 20)
    print(report.mc_table(res))
    kl = res["kl_pi_ref"]
    print(f"  KL(pi||pi_ref) per response ~ {kl['mean']:.4f} +- {kl['ci']:.4f} ({kl['samples']} samples)")
    return {"mode": "mc", "settings": {"overrides": a.overrides, "model": cfg.model.name, "prompt": problem.prompt,
                                       "group_size": G, "baseline": pg.baseline, "agg": pg.agg, "noise": a.noise,
                                       "seed": cfg.seed, "beta": 1.0}, **res}
