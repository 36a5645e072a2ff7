"""`klrl audit [OVERRIDE ...]`: argument handling, input limits, and the order of work.

The overrides are `klrl train`'s (`klrl audit algo=grpo estimator=k3 placement=loss generation.temperature=0.7`):
the audit composes the same config, validates it the same way, and audits the loss `klrl train` would run with it
(baseline, aggregation, clamps, importance weights, temperature, top-p) on an enumerable toy. Without an estimator
or placement override it audits every KL configuration under the config's algo. Bad input is one `klrl: ...`
line, exit 2, before any work.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, replace

from functools import lru_cache

import torch
from omegaconf import OmegaConf

from klrl.cli.compose import compose as compose_config
from klrl.cli.compose import preset_departures
from klrl.config.constraints import Int, NonEmpty, NonNegative, flag, unwritable
from klrl.config.schema import MAX_SEED
from klrl.config.specs import is_off_policy, kl_spec, pg_spec, sampling_spec
from klrl.core.losses import KLSpec, PGSpec
from klrl.errors import AuditError, ConfigError
from klrl.paths import CONF_DIR

MAX_GROUPS = 2**18  # N**G groups enumerated per configuration (N responses)
MAX_ROWS = 4096  # N * T per-token score vectors: the Jacobian and its Gram matrix are that size squared
MAX_LENGTH = 64  # longest response (--length, --sweep-lengths) and largest vocabulary and group considered at all
AUTO_SWEEP_GROUPS = 2**13  # the default length sweep stops where it would get slow
# Groups of `klrl train` overrides that change the loss the exact audit enumerates; the rest (model, task, ...)
# only matter to --mc, whose policy is a real model.
EXACT_GROUPS = ("estimator", "placement", "algo", "beta", "generation", "async_level", "preset")
KL_SELECTORS = ("estimator", "placement", "preset")  # naming one of these audits that configuration alone


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own error is two lines (usage + message); we want one
        raise AuditError(message)


def parser() -> argparse.ArgumentParser:
    """The options, each with its declared range (klrl.config.constraints): a value outside it is one line."""
    p = _Parser(prog="klrl audit",
                description="Exact (or Monte-Carlo) bias and variance of the gradient of every KL configuration, "
                            "through the loss `klrl train` runs with the same overrides.")
    size = {n: flag(Int(n, MAX_LENGTH), int) for n in (1, 2)}  # the sizes an enumeration may have
    distance = flag(NonNegative())
    p.add_argument("overrides", nargs="*", help="`klrl train` overrides, e.g. algo=grpo estimator=k3 placement=loss "
                   "generation.temperature=0.7 (default: every KL configuration under algo=rloo)")
    p.add_argument("--vocab", type=size[2], default=3, help="vocabulary size V of the enumerable policy (default 3)")
    p.add_argument("--length", type=size[1], default=3, help="longest response T, the generation budget (default 3)")
    p.add_argument("--no-eos", action="store_true", help="every response has length T (default: token V-1 is EOS)")
    p.add_argument("--group-size", type=size[2], default=2,
                   help="samples per group G (default 2; algo.group_size is too large to enumerate)")
    p.add_argument("--baseline", help="shorthand for the override algo.baseline=B")
    p.add_argument("--distance", type=distance, default=0.5, help="std of the per-logit noise taking pi away from "
                   "pi_ref (default 0.5; the transformer's weights move 0.1x this)")
    p.add_argument("--off-distance", type=distance, default=0.5,
                   help="the same for pi_old away from pi (default 0.5)")
    p.add_argument("--seed", type=flag(Int(0, MAX_SEED), int), default=0,
                   help="seed of the random policies (default 0)")
    p.add_argument("--config", action="append", metavar="PATTERN", type=flag(NonEmpty(), str),
                   help="configurations to audit (glob, repeatable, comma lists; default all)")
    p.add_argument("--policy", default="both", choices=("tabular", "transformer", "both"), help="parametrisation(s)")
    p.add_argument("--sweep-vocab", type=size[2], default=2, help="V of the length sweep (default 2, binary tokens)")
    p.add_argument("--sweep-lengths", default="auto", help="T values of the sweep: 1-6, 1,2,4, auto, or none")
    p.add_argument("--sweep-seeds", type=flag(Int(1, 10**4), int), default=4,
                   help="random policy pairs averaged per length (default 4)")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--plot", metavar="PATH", help="write the bias/variance-against-T plot (PNG) here")
    p.add_argument("--markdown", action="store_true",
                   help="print the README's verdict tables (generated, never typed) and exit")
    p.add_argument("--mc", action="store_true", help="Monte-Carlo mode on a real model (model=..., task=...)")
    p.add_argument("--batches", type=flag(Int(8, 10**7), int), default=200,
                   help="--mc: paired test batches (default 200)")
    p.add_argument("--pilot", type=flag(Int(1, 10**7), int), default=200,
                   help="--mc: pilot batches of the reference (default 200)")
    p.add_argument("--noise", type=flag(NonNegative()), default=0.05,
                   help="--mc: relative weight noise taking pi away from pi_ref")
    return p


def _check_size(what: str, V: int, T: int, G: int, eos: bool) -> None:
    from klrl.core.toy import enumerate_sequences

    n = len(enumerate_sequences(V, T, V - 1 if eos else None)[0]) if V**T <= 10**6 else V**T
    if n**G > MAX_GROUPS:
        raise AuditError(f"{what} V={V} T={T} G={G} needs N^G = {_big(n)}^{G} = {_big(n**G)} groups to enumerate; "
                         f"the limit is {MAX_GROUPS} (lower the vocabulary, the length or --group-size)")
    if n * T > MAX_ROWS:
        raise AuditError(f"{what} V={V} T={T} has N*T = {n * T} per-token score vectors; the limit is {MAX_ROWS}")


def _big(x: int) -> str:
    return f"{x:.3g}" if x < 10**300 else f"~1e{int(x.bit_length() * math.log10(2))}"


def _lengths(spec: str, V: int, G: int, eos: bool) -> list[int]:
    if spec == "none":
        return []
    if spec == "auto":
        return [T for T in range(1, 7) if (V**T) ** G <= AUTO_SWEEP_GROUPS and V**T * T <= MAX_ROWS]
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            out = list(range(lo, min(hi, MAX_LENGTH + 1) + 1))
        else:
            out = [int(x) for x in spec.split(",")]
    except ValueError:
        raise AuditError(f"--sweep-lengths {spec!r} is not valid; use e.g. 1-6, 1,2,4, auto or none") from None
    if not out or min(out) < 1 or max(out) > MAX_LENGTH:
        raise AuditError(f"--sweep-lengths {spec!r} must list lengths in 1..{MAX_LENGTH}")
    for T in out:
        _check_size("--sweep-lengths:", V, T, G, False)
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".")[0].split("/")[0]


def compose(a: argparse.Namespace):
    """The `klrl train` config of the overrides, validated (one line on error)."""
    overrides = list(a.overrides) + ([f"algo.baseline={a.baseline}"] if a.baseline else [])
    if not a.mc:
        for o in overrides:
            if _key(o) not in EXACT_GROUPS:
                raise AuditError(f"{o!r} has no effect on the exact audit, whose policy is an enumerable toy; it "
                                 f"takes {', '.join(EXACT_GROUPS)} overrides (use --mc to audit model=/task=)")
    return compose_config(overrides)


def validate(a: argparse.Namespace):
    """-> (the composed config, the configurations to audit)."""
    from klrl.audit.configs import from_config, select

    cfg = compose(a)
    if cfg.estimator.name == "none":
        if _preset(cfg):  # a framework setting whose KL is inert: `main` says so, with its verdict
            return cfg, []
        raise AuditError("estimator=none has no KL gradient to audit; choose an estimator")
    patterns = [p for arg in a.config or [] for p in arg.split(",") if p]
    named = any(_key(o) in KL_SELECTORS for o in a.overrides)
    if named and patterns:
        raise AuditError("--config and estimator=/placement= overrides both choose configurations; use one")
    clamps = (cfg.estimator.clamp_log_ratio, cfg.estimator.clamp_value)
    try:
        configs = [from_config(cfg)] if named else select(patterns, float(cfg.beta), clamps)
    except ValueError as e:
        raise AuditError(str(e)) from None
    if a.mc:  # the numbers' ranges are declared with the options (parser)
        return cfg, configs
    _check_size("--vocab/--length/--group-size:", a.vocab, a.length, a.group_size, not a.no_eos)
    a.lengths = _lengths(a.sweep_lengths, a.sweep_vocab, a.group_size, not a.no_eos)
    return cfg, configs


def describe(cfg, a: argparse.Namespace) -> str:
    from klrl.config.specs import is_off_policy
    from klrl.config.specs import pg_spec, sampling_spec

    pg, s = pg_spec(cfg, budget=a.length), sampling_spec(cfg)
    trains = "off-policy" if is_off_policy(cfg) else "on-policy"
    parts = [f"algo={cfg.algo.name} (baseline {pg.baseline}, agg {pg.agg}", ]
    if pg.agg_norm is not None:
        parts[-1] += f" / {pg.agg_norm:g}"
    parts[-1] += ")"
    if pg.is_truncate is not None or pg.ratio_clip is not None:
        parts.append(f"is_truncate={pg.is_truncate} ratio_clip={pg.ratio_clip}")
    if s.temperature != 1 or s.top_p != 1:
        parts.append(f"temperature={s.temperature:g} top_p={s.top_p:g}")
    eos = "no EOS" if a.no_eos else "EOS = token V-1"
    return (f"{', '.join(parts)}; beta={cfg.beta:g}, this config trains {trains}; V={a.vocab} T<={a.length} ({eos}) "
            f"G={a.group_size} (algo.group_size={cfg.algo.group_size} is not enumerable)")


def run_exact(a: argparse.Namespace, cfg, configs: list) -> dict:
    from klrl.audit import report
    from klrl.audit.run import audit_policy, length_sweep
    from klrl.config.specs import pg_spec, sampling_spec

    pg, sampling = pg_spec(cfg, budget=a.length), sampling_spec(cfg)
    eos = None if a.no_eos else a.vocab - 1
    kinds = ["tabular", "transformer"] if a.policy == "both" else [a.policy]
    keys = ("vocab", "length", "group_size", "distance", "off_distance", "seed")
    settings = {k: getattr(a, k) for k in keys}
    result: dict = {"mode": "exact", "settings": {
        **settings, "eos": eos, "overrides": list(a.overrides), "algo": cfg.algo.name, "baseline": pg.baseline,
        "agg": pg.agg, "agg_norm": pg.agg_norm, "beta": float(cfg.beta), "temperature": sampling.temperature,
        "top_p": sampling.top_p, "limits": {"max_groups": MAX_GROUPS, "max_score_vectors": MAX_ROWS}},
        "policies": {}}
    for kind in kinds:
        result["policies"][kind] = audit_policy(kind, a.vocab, a.length, a.group_size, pg, a.distance,
                                                a.off_distance, a.seed, configs, sampling, eos)
    if a.lengths:
        seeds = [a.seed + 1000 * i for i in range(a.sweep_seeds)]
        # Fixed-length responses: "against T" means what it says (the paper's Fig. 2 toy, binary tokens).
        sweep = length_sweep(a.sweep_vocab, a.lengths, a.group_size, pg, a.distance, seeds, configs, sampling)
        result["length_sweep"] = {**sweep, "group_size": a.group_size, "baseline": pg.baseline, "agg": pg.agg}
    print(describe(cfg, a))
    print()
    print(report.regime_table("On-policy (y ~ pi)", result, "on_policy", a.group_size))
    print()
    print(report.regime_table("Off-policy (y ~ pi_old, weights as configured)", result, "off_policy", a.group_size))
    print()
    if len(configs) > 1:
        presets = preset_verdicts(list(a.overrides), [c.name for c in configs])
        result["presets"] = {algo: {**p, "configs": {n: {k: {**asdict(v), "text": v.text} for k, v in regs.items()}
                                                      for n, regs in p["configs"].items()}}
                             for algo, p in presets.items()}
        print(report.preset_table(presets))
        print()
    if "length_sweep" in result:
        print(report.sweep_table(result["length_sweep"]))
        print()
    if _preset(cfg):
        result["preset"] = preset_summary(a, cfg)
        print()
    print(report.LEGEND)
    return result


def _check_writable(path: str | None, what: str) -> None:
    """Before the work: an output path that cannot be written fails now, not after the whole audit."""
    why = path is not None and unwritable(path, "file")
    if why:
        raise AuditError(f"{what} {path} cannot be written ({why}); choose another path")


def main(argv: list[str]) -> None:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        a = parser().parse_args(argv)
        if a.markdown:
            print(readme_tables(), end="")
            return
        cfg, configs = validate(a)
        _check_writable(a.json, "--json")
        _check_writable(a.plot, "--plot")
        if a.plot and (a.mc or not a.lengths):
            raise AuditError("--plot draws the exact length sweep; it needs a sweep and no --mc")
        if not configs:  # a preset whose KL is inert (validate): its summary is the whole audit
            result = {"mode": "exact", "preset": preset_summary(a, cfg)}
        elif a.mc:
            from klrl.cli.audit_mc import run_mc

            result = run_mc(a, configs)
        else:
            # Thousands of tiny tensor ops: intra-op threads only add synchronisation, and on a busy machine their
            # spin-waits slow the audit down 10-20x.
            torch.set_num_threads(1)
            result = run_exact(a, cfg, configs)
    except ConfigError as e:
        print(f"klrl: audit: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        torch.set_num_threads(threads)
    from klrl.audit import report

    result["runtime_s"] = round(time.perf_counter() - t0, 2)
    try:
        if a.json:
            report.write_json(a.json, result)
        if a.plot and "length_sweep" in result:
            report.write_plot(a.plot, result["length_sweep"])
    except OSError as e:
        print(f"klrl: audit: cannot write {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(f"\naudit finished in {result['runtime_s']:.1f} s")


# --- framework presets (conf/preset/): their verdicts on- and off-policy, and the framework table ----------------

FRAMEWORKS = ("verl", "TRL", "OpenRLHF", "open-instruct", "slime", "NeMo-RL", "SkyRL", "DeepSeek-V3.2")
REFERENCE = KLSpec("k1", 1.0, in_reward=True), PGSpec("rloo")  # klrl's default: k1 in the reward, RLOO, seq_sum


def _preset(cfg) -> str | None:
    return (cfg.get("preset") or {}).get("name")


def preset_names() -> list[str]:
    """conf/preset/'s presets, in the order of FRAMEWORKS (then by name)."""
    from klrl.cli.compose import group_options, hydra_context

    with hydra_context():
        names = group_options("preset")
    frameworks = {n: OmegaConf.load(f"{CONF_DIR}/preset/{n}.yaml").preset.framework for n in names}
    rank = {f: i for i, f in enumerate(FRAMEWORKS)}
    return sorted(names, key=lambda n: (rank.get(frameworks[n], len(rank)), n))


def off_policy_config(overrides: list[str], cfg):
    """The config trained off-policy as its framework does: two updates per batch, with the preset's off-policy knobs
    (PPO clip, dual clip, ratio log-clamp; refused on-policy, where they act on nothing) unless set already."""
    if is_off_policy(cfg):
        return cfg
    given = {o.split("=", 1)[0] for o in overrides}
    knobs = [k for k in (cfg.preset.off_policy or "").split() if k.split("=", 1)[0] not in given]
    return compose_config([*overrides, "algo.updates_per_batch=2", *knobs])


@lru_cache(maxsize=None)
def _enumeration(toy, sampling):
    from klrl.audit import exact as ex
    from klrl.audit.policies import TRIPLES

    tr = TRIPLES[toy.kind](toy.vocab, toy.length, toy.distance, toy.off_distance, toy.seed, eos=toy.eos_id)
    return ex.enumerate_groups(tr.policy, tr.ref, toy.group_size, sampling=sampling)


def noise(kl: KLSpec, pg: PGSpec, toy, sampling) -> float | None:
    """tr Cov[g] / |E g|^2 of one group's KL gradient, on-policy, exact: scale-free (beta and an aggregation's
    constant factor cancel), so presets with different betas and normalisers compare. None without a mean."""
    from klrl.audit import exact as ex
    from klrl.audit.verdicts import toy_pg

    if kl.estimator is None:
        return None
    en = _enumeration(toy, sampling)
    mean, var = ex.moments(en, ex.loss_coefficients(en, kl, toy_pg(pg, toy)))
    size = float(mean @ mean)
    return var / size if size > 0 else None


def preset_row(overrides: list[str], cfg, toy) -> dict:
    """One framework setting: its exact verdicts on-policy (the off-policy knobs act on nothing there) and
    off-policy with them (klrl.audit.verdicts), and its noise relative to klrl's default k1-in-reward, on `toy`."""
    from klrl.audit.verdicts import verdict

    s, kl, pg = sampling_spec(cfg), kl_spec(cfg), pg_spec(cfg, budget=toy.length)
    on = verdict(kl, pg, s, False, toy)
    # With every response as long as the budget, a token mean only divides by it: what is left is the estimator's
    # and the placement's own direction, which variable lengths (EOS) bend.
    equal = verdict(kl, pg, s, False, replace(toy, eos=False))
    off_cfg = off_policy_config(overrides, cfg)
    off = verdict(kl_spec(off_cfg), pg_spec(off_cfg, budget=toy.length), s, True, toy)
    mine, ref = noise(kl, pg, toy, s), noise(*REFERENCE, toy, s)
    p = cfg.preset
    return {"framework": p.framework, "setting": p.setting, "preset": p.name, "on_policy": on, "off_policy": off,
            "equal_lengths": equal, "off_policy_knobs": off_cfg.preset.off_policy or "", "differs": p.differs or "",
            "noise": None if mine is None or not ref else mine / ref, "source": p.source}


def preset_summary(a: argparse.Namespace, cfg) -> dict:
    """`klrl audit preset=X`: the framework, its setting and its verdicts, printed; the numbers returned."""
    from klrl.audit.verdicts import Toy

    toy = Toy(vocab=a.vocab, length=a.length, group_size=a.group_size, eos=not a.no_eos, distance=a.distance,
              off_distance=a.off_distance, seed=a.seed)
    row = preset_row(list(a.overrides), cfg, toy)
    on, off = row["on_policy"], row["off_policy"]
    noise_text = "n/a (no KL)" if row["noise"] is None else f"{row['noise']:.3g} x k1-in-reward's (tr Cov / |E g|^2)"
    print(f"preset={row['preset']}: {row['framework']} {row['setting']}\n  source: {row['source']}\n"
          f"  gradient, on-policy:  {on.text}\n"
          f"  gradient, on-policy, every response {toy.length} tokens long: {row['equal_lengths'].text}\n"
          f"  gradient, off-policy: {off.text}  (with {row['off_policy_knobs'] or 'no off-policy knobs'})\n"
          f"  noise: {noise_text}\n  differs from the framework: {row['differs'] or 'nothing klrl models'}")
    changed = preset_departures(cfg)
    if changed:  # the verdicts above are of this config, not of the framework's own setting
        print(f"  changed from the preset here: {'; '.join(changed)}: the gradient above is this config's, not "
              f"{row['framework']}'s own")
    return {**row, **{k: {**asdict(row[k]), "text": row[k].text} for k in ("on_policy", "equal_lengths", "off_policy")}}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def framework_table(toy=None) -> str:
    """The framework table (markdown): every conf/preset/ setting's exact gradient, generated, never typed."""
    import pandas as pd

    from klrl.audit.verdicts import DEFAULT_TOY

    toy = toy or DEFAULT_TOY
    rows = []
    for name in preset_names():
        cfg = compose_config([f"preset={name}"])
        r = preset_row([f"preset={name}"], cfg, toy)
        no_kl = r["on_policy"].label == "no KL"
        rows.append({"framework": r["framework"], "setting": _cell(r["setting"]), "klrl preset": f"`preset={name}`",
                     "gradient it gives (on-policy)": r["on_policy"].short,
                     "same, equal lengths": r["equal_lengths"].short,
                     "off-policy (framework's clip)": r["off_policy"].short,
                     "unbiased off-policy?": "n/a (no KL)" if no_kl else ("yes" if r["off_policy"].unbiased else "no"),
                     "noise vs k1-in-reward": "n/a" if r["noise"] is None else f"{r['noise']:.3g}x"})
    return pd.DataFrame(rows).to_markdown(index=False)


# --- tables across algo presets, and the README's (composed here, computed by klrl.audit.verdicts) ---------


def algo_presets() -> list[str]:
    """The algo presets conf/algo/ ships (rloo, grpo, dr_grpo, ...), the default (the paper's) first."""
    from klrl.cli.compose import group_options, hydra_context

    with hydra_context():
        return sorted(group_options("algo"), key=lambda n: (n != "rloo", n))


def preset_verdicts(overrides: list[str], names: list[str], toy=None) -> dict:
    """{algo preset: {"agg": ..., "baseline": ..., "configs": {name: {"on_policy": Verdict, "off_policy": Verdict}}}}
    for the named KL configurations, with the other overrides (sampling, clamps, beta) applied to every preset."""
    from klrl.audit.configs import select
    from klrl.audit.verdicts import verdict
    from klrl.config.specs import pg_spec, sampling_spec

    base = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0].split("/")[0] != "algo"]
    from klrl.audit.verdicts import DEFAULT_TOY

    toy = toy or DEFAULT_TOY
    out = {}
    for algo in algo_presets():
        cfg = compose_config([*base, f"algo={algo}"])
        pg, sampling = pg_spec(cfg, budget=toy.length), sampling_spec(cfg)
        clamps = (cfg.estimator.clamp_log_ratio, cfg.estimator.clamp_value)
        rows = {c.name: {"on_policy": verdict(c.spec, pg, sampling, False, toy),
                         "off_policy": verdict(c.spec, pg, sampling, True, toy)}
                for c in select(names, float(cfg.beta), clamps)}
        out[algo] = {"baseline": pg.baseline, "agg": pg.agg, "configs": rows}
    return out


def beta_sensitivity(algo: str, names: list[str], betas=(1.0, 0.1, 0.01), toy=None) -> dict:
    """{name: {beta: (scale of the *total* KL gradient along grad KL, i.e. fit * beta; cosine)}} under an algo
    preset: linear in beta for every baseline but grpo's, whose group std rescales a reward-placed penalty."""
    from klrl.audit.configs import select
    from klrl.audit.verdicts import verdict
    from klrl.config.specs import pg_spec, sampling_spec

    from klrl.audit.verdicts import DEFAULT_TOY

    toy = toy or DEFAULT_TOY
    out: dict = {}
    for beta in betas:
        cfg = compose_config([f"algo={algo}", f"beta={beta}"])
        pg, sampling = pg_spec(cfg, budget=toy.length), sampling_spec(cfg)
        for c in select(names, beta):
            v = verdict(c.spec, pg, sampling, False, toy)
            out.setdefault(c.name, {})[beta] = (v.fit * beta, v.cos_rev)
    return out


def _placement_label(est_row: dict) -> str:
    out = est_row["placement"]
    if est_row.get("reward_form") == "togo":
        out += ", togo"
    if est_row.get("reward_is_weight"):
        out += ", reward_is_weight"
    if est_row.get("loss_is_weight"):
        out += ", loss_is_weight"
    return out


README_ROWS = ("reward", "reward+togo", "reward+seqIS", "loss", "loss+tokIS", "both")


def readme_tables() -> str:
    """The README's verdict tables, in markdown: generated from klrl.audit.verdicts, compared by a test."""
    import pandas as pd

    from klrl.audit.configs import all_configs
    from klrl.audit.verdicts import DEFAULT_TOY

    configs = [c for c in all_configs() if c.name.split("-", 1)[1] in README_ROWS]
    names = [c.name for c in configs]
    presets = preset_verdicts([], names)
    rows = []
    for c in configs:
        row = {"estimator": c.estimator,
               "placement": _placement_label({"placement": c.placement, "reward_form": c.reward_form,
                                              "reward_is_weight": c.reward_is_weight,
                                              "loss_is_weight": c.loss_is_weight})}
        for algo, p in presets.items():
            row[f"algo={algo} ({p['agg']})"] = p["configs"][c.name]["on_policy"].short
        row["off-policy, algo=rloo"] = presets["rloo"]["configs"][c.name]["off_policy"].short
        rows.append(row)
    toy = DEFAULT_TOY
    out = [f"<!-- generated by `klrl audit --markdown` (exact enumeration, tabular toy V={toy.vocab} with EOS, "
           f"T<={toy.length}, G={toy.group_size}); tests/test_verdict_sources.py regenerates and compares -->", "",
           pd.DataFrame(rows).to_markdown(index=False), ""]
    sens = beta_sensitivity("grpo", ["k1-reward", "k3-reward", "k3-loss"])
    srows = []
    for name, by_beta in sens.items():
        srow = {"configuration (algo=grpo)": name}
        for beta, (scale, cos) in by_beta.items():
            srow[f"beta={beta:g}"] = f"{scale:.4g} x grad KL (cos {'n/a' if cos is None else f'{cos:.3f}'})"
        srows.append(srow)
    out += ["With `algo=grpo`, the KL gradient's size along grad KL(pi||pi_ref) (the least-squares scale of the "
            "total KL gradient, i.e. per unit beta times beta) and its cosine, task reward tied within groups:", "",
            pd.DataFrame(srows).to_markdown(index=False), ""]
    out += [FRAMEWORK_INTRO, "", framework_table(), ""]
    return "\n".join(out)


FRAMEWORK_INTRO = ("Each framework's KL setting as a `preset` (conf/preset/, docs/frameworks.md), its exact gradient "
                   "per unit beta on the same toy; off-policy with the framework's own clip (`preset.off_policy`); "
                   "noise = tr Cov[g] / |E g|^2 of one group, relative to k1 in the reward with RLOO:")
