"""The one place a configuration's gradient verdict comes from: an exact enumeration through the trainer's loss.

`verdict(kl, pg, sampling, off_policy)` runs the configuration's `policy_loss` over every group of G responses of
the audit's enumerable toy (tabular logits, V=3 tokens one of which is EOS, responses of at most 3 tokens, G=2),
takes the exact expected gradient per unit beta, and `judge` names it against the exact divergence gradients:

    unbiased                      E g = grad KL(pi||pi_ref)
    zero in expectation           E g = 0 (up to float64 round-off)
    scaled (c x grad KL)          E g = c grad KL(pi||pi_ref), c != 1 (right direction, wrong size)
    per-context forward KL        E g = Fctx = sum_s P(s) grad KL(pi_ref(.|s)||pi(.|s))
    token-level partial gradient  E g = Rtok = sum_s P(s) grad KL(pi(.|s)||pi_ref(.|s))
    reverse minus per-context forward KL     E g = grad KL - Fctx
    biased: <formula>             another exact combination of those
    biased (no simple form)       none fits; the least-squares scale along grad KL and the cosine say how far off

Everything that shows a verdict (`klrl audit`, `klrl table`'s Table 1, the exact-gradient test matrix, the
README's tables via `klrl audit --markdown`) calls this module; none of them types one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

from klrl.audit import exact as ex
from klrl.core.distributions import Sampling
from klrl.core.losses import KLSpec, PGSpec

# Words for the named targets of an exact decomposition (see klrl.audit.exact.targets).
WORDS = {
    (("rev", 1.0),): "unbiased",
    (("Fctx", 1.0),): "per-context forward KL",
    (("Rtok", 1.0),): "token-level partial gradient",
    (("Rtok@old", 1.0),): "token-level partial gradient over pi_old's contexts",
    (("Fctx", -1.0), ("rev", 1.0)): "reverse minus per-context forward KL",
}


@dataclass(frozen=True)
class Toy:
    """The enumerable policy triple verdicts are computed on."""

    kind: str = "tabular"  # tabular | transformer
    vocab: int = 3
    length: int = 3
    group_size: int = 2
    eos: bool = True  # the last token ends a response: variable lengths
    distance: float = 0.5  # pi away from pi_ref
    off_distance: float = 0.5  # pi_old away from pi
    seed: int = 0

    @property
    def eos_id(self) -> int | None:
        return self.vocab - 1 if self.eos else None


DEFAULT_TOY = Toy()


@dataclass(frozen=True)
class Verdict:
    """What a configuration's expected KL gradient (per unit beta) is, by exact enumeration."""

    label: str
    parts: tuple[tuple[str, float], ...] | None  # exact decomposition into named targets; () = zero; None = none fits
    scale: float | None  # c when E g is exactly c times the labelled direction (1 for "unbiased")
    fit: float  # least-squares scale of E g along grad KL: <g, rev> / |rev|^2
    residual: float  # |E g - fit * rev| / |E g|: how far from the direction of grad KL (0 when zero)
    cos_rev: float | None  # None when E g is zero up to round-off
    cos_fwd: float | None
    rel_err: float  # |E g - grad KL| / |grad KL|

    @property
    def unbiased(self) -> bool:
        return self.label == "unbiased"

    @property
    def short(self) -> str:
        """A table cell."""
        if self.label == "scaled":
            return f"scaled: {self.scale:.3g} x grad KL"
        if self.parts is None:
            cos = "n/a" if self.cos_rev is None else f"{self.cos_rev:.2f}"
            return f"biased: {self.fit:.3g} x grad KL, cos {cos}"
        if self.scale is not None and abs(self.scale - 1) > 1e-6:
            return f"{self.scale:.3g} x {self.label}"
        return self.label

    @property
    def text(self) -> str:
        """The label with the number that completes it."""
        if self.parts is None:
            cos = "n/a" if self.cos_rev is None else f"{self.cos_rev:.2f}"
            return f"{self.label}: {self.fit:.3g} x grad KL + {self.residual:.0%} off its direction (cos {cos})"
        return self.short


def formula(parts: dict[str, float]) -> str:
    out = ""
    for n, c in parts.items():
        sign = "-" if c < 0 else "+"
        mag = "" if abs(abs(c) - 1) < 1e-6 else f"{abs(c):.3g}*"
        out += f" {sign} {mag}{n}" if out else f"{'-' if c < 0 else ''}{mag}{n}"
    return out


def judge(mean: Tensor, basis: dict[str, Tensor]) -> Verdict:
    """Name an exact mean gradient against the exact targets `basis` (rev, fwd, Fctx, Rtok, ...)."""
    rev = basis["rev"]
    vs_rev, vs_fwd = ex.compare(mean, rev), ex.compare(mean, basis["fwd"])
    parts = ex.decompose(mean, basis)
    fit = float(mean @ rev / (rev @ rev))
    norm = float(mean.norm())
    residual = float((mean - fit * rev).norm()) / norm if vs_rev["cos"] is not None else 0.0
    key = None if parts is None else tuple(sorted((k, round(v, 6)) for k, v in parts.items()))
    scale = None
    if key is None:
        label = "biased (no simple form)"
    elif not key:
        label = "zero in expectation"
    else:
        # A named direction up to a common factor c: `c x <words>` (c = 1: exactly that gradient).
        label = "biased: " + formula(dict(key))
        for c in {v for _, v in key if v != 0}:
            unit = tuple((k, round(v / c, 6)) for k, v in key)
            if unit in WORDS:
                label, scale = WORDS[unit], c
                if label == "unbiased" and abs(c - 1) > 1e-6:
                    label = "scaled"
                break
    return Verdict(label, key, scale, fit, residual, vs_rev["cos"], vs_fwd["cos"], vs_rev["rel_err"])


@lru_cache(maxsize=None)
def _triple(toy: Toy):
    from klrl.audit.policies import TRIPLES

    return TRIPLES[toy.kind](toy.vocab, toy.length, toy.distance, toy.off_distance, toy.seed, eos=toy.eos_id)


@lru_cache(maxsize=None)
def _basis(toy: Toy, sampling: Sampling, off_policy: bool) -> dict[str, Tensor]:
    tr = _triple(toy)
    return ex.targets(tr.policy, tr.ref, tr.old if off_policy else None, sampling)


def toy_pg(pg: PGSpec, toy: Toy) -> PGSpec:
    """The trainer's PGSpec on the toy: a constant-normaliser aggregation divides by the toy's generation budget."""
    if pg.agg == "seq_mean_token_sum_norm":
        from dataclasses import replace

        return replace(pg, agg_norm=float(toy.length))
    return pg


def mean_gradient(kl: KLSpec, pg: PGSpec, sampling: Sampling = Sampling(), off_policy: bool = False,
                  toy: Toy = DEFAULT_TOY) -> Tensor:
    """Exact E[grad of the trainer's loss] per unit beta, task reward 0, on the toy (on- or off-policy)."""
    from klrl.core.toy import expected_gradient

    tr = _triple(toy)
    g = expected_gradient(tr.policy, tr.ref, kl, toy_pg(pg, toy), toy.group_size,
                          behaviour=tr.old if off_policy else None, sampling=sampling)
    return g.detach() / (kl.beta if kl.beta else 1.0)


@lru_cache(maxsize=None)
def verdict(kl: KLSpec, pg: PGSpec, sampling: Sampling = Sampling(), off_policy: bool = False,
            toy: Toy = DEFAULT_TOY) -> Verdict:
    """The verdict of one configuration (the KL and policy-gradient specs the trainer builds from a config)."""
    if kl.estimator is None:
        return Verdict("no KL", (), None, 0.0, 0.0, None, None, 1.0)
    return judge(mean_gradient(kl, pg, sampling, off_policy, toy), _basis(toy, sampling, off_policy))


def config_verdict(cfg, off_policy: bool | None = None, toy: Toy = DEFAULT_TOY) -> Verdict:
    """The verdict of a run's config (a DictConfig or the plain dict a run directory stores). off_policy: default
    whether the run trains off-policy (`is_off_policy`)."""
    from omegaconf import OmegaConf

    from klrl.config.specs import is_off_policy, kl_spec, pg_spec, sampling_spec

    c = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    off = is_off_policy(c) if off_policy is None else off_policy
    return verdict(kl_spec(c), pg_spec(c, budget=toy.length), sampling_spec(c), off, toy)
