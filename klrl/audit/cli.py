"""`klrl audit`: argument handling, input limits, and the order of work. Bad input is one `klrl: ...` line, exit 2."""

from __future__ import annotations

import argparse
import sys
import time

import torch

MAX_GROUPS = 2**18  # (V**T)**G groups enumerated per configuration
MAX_ROWS = 4096  # V**T * T per-token score vectors: the Jacobian and its Gram matrix are that size squared
AUTO_SWEEP_GROUPS = 2**13  # the default length sweep stops where it would get slow


class AuditError(ValueError):
    """Bad input; its message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own error is two lines (usage + message); we want one
        raise AuditError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="klrl audit",
                description="Exact (or Monte-Carlo) bias and variance of every KL configuration's gradient.")
    p.add_argument("--vocab", type=int, default=3, help="vocabulary size V of the enumerable policy (default 3)")
    p.add_argument("--length", type=int, default=3, help="response length T (default 3)")
    p.add_argument("--group-size", type=int, default=2, help="samples per group G (default 2)")
    p.add_argument("--baseline", default="rloo", help="group baseline: rloo | grpo | dr_grpo | none (default rloo)")
    p.add_argument("--distance", type=float, default=0.5, help="std of the per-logit noise taking pi away from pi_ref "
                   "(default 0.5; the transformer's weights move 0.1x this)")
    p.add_argument("--off-distance", type=float, default=0.5, help="the same for pi_old away from pi (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policies (default 0)")
    p.add_argument("--config", action="append", metavar="PATTERN",
                   help="configurations to audit (glob, repeatable, comma lists; default all 33)")
    p.add_argument("--policy", default="both", choices=("tabular", "transformer", "both"), help="parametrisation(s)")
    p.add_argument("--sweep-vocab", type=int, default=2, help="V of the length sweep (default 2, binary tokens)")
    p.add_argument("--sweep-lengths", default="auto", help="T values of the sweep: 1-6, 1,2,4, auto, or none")
    p.add_argument("--sweep-seeds", type=int, default=4, help="random policy pairs averaged per length (default 4)")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--plot", metavar="PATH", help="write the bias/variance-against-T plot (PNG) here")
    p.add_argument("--mc", action="store_true",
                   help="Monte-Carlo mode on a real model; overrides of conf/train.yaml: model=..., algo=..., seed=...")
    p.add_argument("--batches", type=int, default=200, help="--mc: paired test batches (default 200)")
    p.add_argument("--pilot", type=int, default=200, help="--mc: pilot batches of the reference (default 200)")
    p.add_argument("--noise", type=float, default=0.05, help="--mc: relative weight noise taking pi away from pi_ref")
    p.add_argument("overrides", nargs="*", help="--mc only: Hydra overrides of conf/train.yaml, e.g. model=tiny")
    return p


def _check_size(what: str, V: int, T: int, G: int) -> None:
    n = V**T
    if n**G > MAX_GROUPS:
        raise AuditError(f"{what} V={V} T={T} G={G} needs (V^T)^G = {n}^{G} = {n**G:.3g} groups to enumerate; "
                         f"the limit is {MAX_GROUPS} (lower the vocabulary, the length or --group-size)")
    if n * T > MAX_ROWS:
        raise AuditError(f"{what} V={V} T={T} has V^T*T = {n * T} per-token score vectors; the limit is {MAX_ROWS}")


def _lengths(spec: str, V: int, G: int) -> list[int]:
    if spec == "none":
        return []
    if spec == "auto":
        return [T for T in range(1, 7) if (V**T) ** G <= AUTO_SWEEP_GROUPS and V**T * T <= MAX_ROWS]
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            out = list(range(lo, hi + 1))
        else:
            out = [int(x) for x in spec.split(",")]
    except ValueError:
        raise AuditError(f"--sweep-lengths {spec!r} is not valid; use e.g. 1-6, 1,2,4, auto or none") from None
    if not out or min(out) < 1:
        raise AuditError(f"--sweep-lengths {spec!r} must list lengths >= 1")
    for T in out:
        _check_size("--sweep-lengths:", V, T, G)
    return out


def validate(a: argparse.Namespace) -> list:
    from klrl.audit.configs import select
    from klrl.losses import BASELINES

    if a.baseline not in BASELINES:
        raise AuditError(f"--baseline {a.baseline!r} is not valid; choose from: {', '.join(BASELINES)}")
    if a.overrides and not a.mc:
        raise AuditError(f"overrides such as {a.overrides[0]!r} apply to --mc only")
    patterns = [p for arg in a.config or [] for p in arg.split(",") if p]
    try:
        configs = select(patterns)
    except ValueError as e:
        raise AuditError(str(e)) from None
    if a.mc:
        if a.batches < 8 or a.pilot < 1:
            raise AuditError(f"--batches {a.batches} / --pilot {a.pilot}: need >= 8 test batches and >= 1 pilot batch")
        return configs
    if a.vocab < 2 or a.length < 1:
        raise AuditError(f"--vocab {a.vocab} / --length {a.length}: need a vocabulary >= 2 and a length >= 1")
    if a.sweep_vocab < 2:
        raise AuditError(f"--sweep-vocab {a.sweep_vocab}: need >= 2")
    if a.group_size < 2:
        raise AuditError(f"--group-size {a.group_size} is too small; a group needs >= 2 samples "
                         "(the single-sample estimator is reported in the 'var 1' column)")
    if a.distance < 0 or a.off_distance < 0:
        raise AuditError("--distance and --off-distance must be >= 0")
    _check_size("--vocab/--length/--group-size:", a.vocab, a.length, a.group_size)
    if a.sweep_seeds < 1:
        raise AuditError(f"--sweep-seeds {a.sweep_seeds}: need >= 1")
    a.lengths = _lengths(a.sweep_lengths, a.sweep_vocab, a.group_size)
    return configs


def run_exact(a: argparse.Namespace, configs: list) -> dict:
    from klrl.audit import report
    from klrl.audit.run import audit_policy, length_sweep

    kinds = ["tabular", "transformer"] if a.policy == "both" else [a.policy]
    keys = ("vocab", "length", "group_size", "baseline", "distance", "off_distance", "seed")
    settings = {k: getattr(a, k) for k in keys}
    result: dict = {"mode": "exact", "settings": {**settings, "beta": 1.0, "agg": "seq_sum", "limits": {
        "max_groups": MAX_GROUPS, "max_score_vectors": MAX_ROWS}}, "policies": {}}
    for kind in kinds:
        result["policies"][kind] = audit_policy(kind, a.vocab, a.length, a.group_size, a.baseline, a.distance,
                                                a.off_distance, a.seed, configs)
    if a.lengths:
        seeds = [a.seed + 1000 * i for i in range(a.sweep_seeds)]
        sweep = length_sweep(a.sweep_vocab, a.lengths, a.group_size, a.baseline, a.distance, seeds, configs)
        result["length_sweep"] = {**sweep, "group_size": a.group_size, "baseline": a.baseline}
    desc = f"V={a.vocab} T={a.length} G={a.group_size}, baseline {a.baseline}"
    print(report.regime_table(f"On-policy (y ~ pi), {desc}", result, "on_policy", a.group_size))
    print()
    title = f"Off-policy (y ~ pi_old, weights as configured), {desc}"
    print(report.regime_table(title, result, "off_policy", a.group_size))
    print()
    if "length_sweep" in result:
        print(report.sweep_table(result["length_sweep"]))
        print()
    print(report.LEGEND)
    return result


def main(argv: list[str]) -> None:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        a = parser().parse_args(argv)
        configs = validate(a)
        if a.plot and (a.mc or not a.lengths):
            raise AuditError("--plot draws the exact length sweep; it needs a sweep and no --mc")
        if a.mc:
            from klrl.audit.mc_cli import run_mc

            result = run_mc(a, configs)
        else:
            # Thousands of tiny tensor ops: intra-op threads only add synchronisation, and on a busy machine their
            # spin-waits slow the audit down 10-20x.
            torch.set_num_threads(1)
            result = run_exact(a, configs)
    except AuditError as e:
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
