"""Monte-Carlo audit: each configuration's mean gradient from sampled batches, with a significance test.

Works on anything that can draw a batch of G responses and score them: `EnumerableSampler` (a tabular or tiny
enumerable policy, where the exact answer is known and checks this code) or `ModelSampler` (a real causal LM through
klrl.sampling.rollout.generate / response_logits / token_logprobs). Either way the gradient is that of the real
`policy_loss`, taken by autograd on the sampler's parameters.

The test, per configuration c, against the reference r = k1-reward (unbiased on-policy):
  1. A pilot set of batches estimates m_r = E[g_r]; u = m_r / ||m_r|| is the "true KL gradient" direction.
  2. U = [u, q_1 .. q_{k-1}]: u plus random directions (seeded, orthonormalised), fixed before the test batches.
  3. On n fresh batches, the gradients of c and r are taken on the *same* samples (paired): d_b = U^T (g_c - g_r).
  4. Hotelling's one-sample T^2 on d (H0: E[g_c] and E[g_r] agree along U): F = (n-k)/(k(n-1)) T^2 ~ F(k, n-k),
     exact for Gaussian d, asymptotically valid by the CLT. Differences are reported at Bonferroni level alpha/m.
  The projection of E[g_c] on u relative to that of E[g_r] ("scale") is reported with a 95% CI: 1 for an unbiased
  configuration, 0 for one with no component along the KL gradient.
A k-dimensional projection cannot prove equality in all P dimensions; it detects any bias with a component in the
span of U, which with u included covers the biases that matter for a descent step (and random q's catch others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from klrl.core.losses import PGSpec, policy_loss


@dataclass
class Batch:
    logp: Tensor  # [B, T] differentiable
    old: Tensor  # [B, T] sampler's log-probs (detached)
    ref: Tensor  # [B, T]
    mask: Tensor  # [B, T]
    rewards: Tensor  # [B]


class Sampler(Protocol):
    group_size: int

    def params(self) -> list[Tensor]: ...

    def draw(self) -> Batch: ...


class EnumerableSampler:
    """i.i.d. groups from `behaviour` (default: the policy) over an enumerable policy's responses."""

    def __init__(self, policy, ref, group_size: int, behaviour=None, seed: int = 0, sampling=None):
        from klrl.core.distributions import Sampling
        from klrl.core.toy import responses

        self.policy, self.ref, self.group_size = policy, ref, group_size
        self.sampling = sampling or Sampling()
        self.behaviour = behaviour if behaviour is not None else policy
        r = responses(self.behaviour, self.sampling)
        self.seqs, self.mask, self.probs, self.old = r.seqs, r.mask, r.prob, r.old
        self.gen = torch.Generator().manual_seed(seed)

    def params(self) -> list[Tensor]:
        return [self.policy.theta]

    def draw(self) -> Batch:
        from klrl.core.toy import scored

        idx = torch.multinomial(self.probs, self.group_size, replacement=True, generator=self.gen)
        logp, ref = scored(self.policy, self.ref, self.seqs[idx], self.mask[idx], self.sampling)
        return Batch(logp, self.old[idx], ref, self.mask[idx], torch.zeros(len(idx), dtype=logp.dtype))


class ModelSampler:
    """G responses to one fixed prompt from a causal LM, scored the way the trainer scores them (on-policy)."""

    def __init__(self, model, ref, tokenizer, prompt_ids: list[int], group_size: int, max_new_tokens: int,
                 sampling=None):
        from klrl.core.distributions import Sampling

        self.model, self.ref, self.tok = model, ref, tokenizer
        self.prompt_ids, self.group_size, self.max_new_tokens = prompt_ids, group_size, max_new_tokens
        self.sampling = sampling or Sampling()

    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def draw(self) -> Batch:
        from klrl.core.distributions import token_logprobs
        from klrl.sampling.rollout import generate, sampler_logits, support_of

        # Scored as the trainer scores them: the distribution sampled from (temperature, top-p), the reference cut
        # to the policy's support.
        T, p = self.sampling.temperature, self.sampling.top_p
        ro = generate(self.model, self.tok, [self.prompt_ids] * self.group_size, self.max_new_tokens, T, p)
        device = next(self.model.parameters()).device
        mask = ro.response_mask.to(device)
        logits = sampler_logits(self.model, ro, T, p)
        logp = token_logprobs(logits, ro.responses, mask)
        with torch.no_grad():
            ref = token_logprobs(sampler_logits(self.ref, ro, T, p, support=support_of(logits, p)), ro.responses, mask)
        return Batch(logp, logp.detach(), ref, mask, torch.zeros(len(mask), device=device))


def batch_gradients(sampler: Sampler, specs: dict, pg: PGSpec, proj: Tensor | None = None) -> dict[str, Tensor]:
    """One drawn batch: {config: grad of policy_loss, flattened (or projected: U^T grad)}; the samples are shared."""
    b = sampler.draw()
    params = sampler.params()
    out = {}
    names = list(specs)
    for i, name in enumerate(names):
        loss = policy_loss(b.logp, b.old, b.ref, b.mask, b.rewards, sampler.group_size, pg, specs[name]).loss
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(names) - 1, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        out[name] = flat.detach() if proj is None else (flat @ proj).detach().double().cpu()
    return out


def hotelling(d: Tensor, mu0: Tensor | None = None) -> tuple[float, float]:
    """One-sample Hotelling T^2 of H0: E[d] = mu0 on n x k samples (any k >= 1, n > k) -> (T^2, p-value), the
    p-value from F = (n-k)/(k(n-1)) T^2 ~ F(k, n-k) (scipy's F survival function). With k = 1 it is the two-sided
    one-sample t-test."""
    from scipy.stats import f as f_dist

    n, k = d.shape
    if n <= k:
        raise ValueError(f"Hotelling's T^2 needs more samples than dimensions (n={n}, k={k})")
    diff = d.mean(0) - (mu0 if mu0 is not None else 0)
    cov = torch.cov(d.T).reshape(k, k)
    t2 = float(n * diff @ torch.linalg.solve(cov, diff))
    return t2, float(f_dist.sf((n - k) / (k * (n - 1)) * t2, k, n - k))


def mean_ci(x: Tensor, z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of the normal-approximation CI)."""
    return float(x.mean()), float(z * x.std() / math.sqrt(len(x)))


def projection_basis(u: Tensor, k: int, seed: int) -> Tensor:
    """[P, k] orthonormal: u first, then k - 1 seeded random directions."""
    u = u.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(len(u), k - 1, generator=gen, dtype=torch.float64)], 1))
    if q[:, 0] @ u < 0:  # QR fixes each column only up to sign; keep u's orientation so that scales read as fractions
        q[:, 0] *= -1
    return q


def ratio_ci(x: Tensor, y: Tensor, z: float = 1.96) -> tuple[float, float]:
    """mean(x) / mean(y) for paired samples, with the delta-method CI half-width."""
    r = float(x.mean() / y.mean())
    return r, float(z * (x - r * y).std() / (math.sqrt(len(x)) * y.mean().abs()))


def mc_audit(sampler: Sampler, specs: dict, pg: PGSpec, n_batches: int, n_pilot: int, reference: str = "k1-reward",
             k: int = 4, seed: int = 0, alpha: float = 0.05, progress=None) -> dict:
    """The test described in the module docstring, on a k-dimensional projection (any k >= 1; k < n_batches).
    Returns {"reference", "pilot_norm", "configs": {name: ...}}."""
    if not 1 <= k < n_batches:
        raise ValueError(f"the projection needs 1 <= k < n_batches (k={k}, n_batches={n_batches})")
    ref_spec = {reference: specs[reference]}
    pilot = sum(batch_gradients(sampler, ref_spec, pg)[reference].double().cpu() for _ in range(n_pilot)) / n_pilot
    basis = projection_basis(pilot / pilot.norm(), k, seed)
    proj = basis.to(dtype=sampler.params()[0].dtype, device=sampler.params()[0].device)
    rows: dict[str, list[Tensor]] = {name: [] for name in specs}
    for b in range(n_batches):
        for name, z in batch_gradients(sampler, specs, pg, proj).items():
            rows[name].append(z)
        if progress:
            progress(b + 1, n_batches)
    z = {name: torch.stack(v) for name, v in rows.items()}
    ref_u, ref_u_ci = mean_ci(z[reference][:, 0])
    m = max(1, len(specs) - 1)
    out = {}
    for name, zc in z.items():
        u_mean, u_ci = mean_ci(zc[:, 0])
        scale, scale_ci = ratio_ci(zc[:, 0], z[reference][:, 0])
        row = {"proj_u": u_mean, "proj_u_ci": u_ci, "scale": scale, "scale_ci": scale_ci}
        if name != reference:
            d = zc - z[reference]
            if d.abs().max() <= 1e-5 * z[reference].abs().max():
                # The same estimator batch by batch (e.g. seqIS on-policy, where the weight is 1): the test would
                # only see float rounding, which is systematic and would look "significant".
                row.update(t2=0.0, p=1.0, differs=False, identical=True)
            else:
                t2, p = hotelling(d)
                row.update(t2=t2, p=p, differs=p < alpha / m, identical=False)
        out[name] = row
    return {"reference": reference, "pilot_norm": float(pilot.norm()), "ref_proj_u": ref_u, "ref_proj_u_ci": ref_u_ci,
            "n_batches": n_batches, "n_pilot": n_pilot, "k": k, "alpha": alpha, "bonferroni_m": m, "configs": out,
            "basis": basis, "z": z}
