"""Where a klrl training step's time goes, on the vs_trl.py workload: per step, the model's forward calls and
backward against klrl's own work; and what one transformers forward costs at one token and at the batch's shape
(fixed cost per call vs arithmetic). Writes benchmarks/results/step_breakdown.json (one entry per model x pairing
x threads, merged into what is there).

    python benchmarks/step_breakdown.py --model tiny --threads 1

The sections are timed by wrapping the functions the trainer calls (a few µs each), in the real trainer step
(vs_trl.KlrlStepper): generation's prefill and decoding loop, the update's log-prob passes, backward, AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from report import COUNT, RESULTS, THREADS, machine, save  # benchmarks/report.py
from vs_trl import PAIRINGS, WORKLOADS, KlrlStepper


def timed(mod, name: str, into: dict, label: str | None = None) -> None:
    """Replace mod.name by a wrapper that adds its wall time to into[label or name]."""
    fn = getattr(mod, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into[label or name] = into.get(label or name, 0.0) + time.perf_counter() - t0

    setattr(mod, name, wrapper)


def sections(stepper: KlrlStepper, steps: int) -> dict:
    """Mean ms per step of each section, and of the whole step, generation and update."""
    import klrl.sampling.batch as batch
    import klrl.sampling.rollout as rollout
    import klrl.training.update as update

    t: dict = {}
    timed(rollout, "decode", t, "generate: model calls and sampling (decode)")
    timed(batch, "encode_prompts", t, "generate: encode prompts")
    timed(batch, "decode_responses", t, "generate: decode responses")
    timed(update, "sampler_logits", t, "update: policy and reference forwards")
    timed(update, "optimizer_step", t, "update: clip + AdamW")
    for name in ("policy_loss", "token_logprobs", "kl_and_entropy", "sequence_estimates", "metrics"):
        timed(update, name, t, "update: klrl's loss, log-probs and logged extras")
    backward = torch.Tensor.backward
    timed(torch.Tensor, "backward", t, "update: backward")  # put back below: other code in the process calls it
    try:
        for _ in range(5):
            stepper.step()
        t.clear()
        recs = []
        for _ in range(steps):
            t0 = time.perf_counter()
            r = stepper.step()
            recs.append({**r, "total_s": time.perf_counter() - t0})
    finally:
        torch.Tensor.backward = backward
    ms = {k: round(1000 * v / steps, 2) for k, v in sorted(t.items())}
    total = {key: round(1000 * statistics.mean(r[key] for r in recs), 2) for key in ("total_s", "generate_s", "update_s")}
    return {"step_ms": total["total_s"], "generate_ms": total["generate_s"], "update_ms": total["update_s"],
            "sections_ms": ms}


def forward_cost(model, batch: int, length: int, reps: int = 100) -> dict:
    """ms of one forward (no_grad) and of forward + backward, at one token and at [batch, length], with the
    executed GFLOP/s at [batch, length] (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1000 * statistics.median(ts)

    def fwd(x):
        with torch.no_grad():
            model(input_ids=x, use_cache=False)

    def fwd_bwd(x):
        model(input_ids=x, use_cache=False).logits.float().sum().backward()
        model.zero_grad(set_to_none=True)

    one = torch.ones(1, 1, dtype=torch.long)
    full = torch.ones(batch, length, dtype=torch.long)
    model.train()
    out = {}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        with FlopCounterMode(display=False) as fc:
            fn(full)
        ms = median_ms(lambda: fn(full))
        out[name] = {"one_token_ms": round(median_ms(lambda: fn(one)), 3), "batch_ms": round(ms, 3),
                     "batch_gflops": round(fc.get_total_flops() / ms / 1e6, 1)}
    return out


def summary_line(r: dict) -> str:
    s, parts = r["sections"], r["sections"]["sections_ms"]
    model = sum(v for k, v in parts.items() if "forward" in k or "backward" in k or "model calls" in k)
    return (f"step {s['step_ms']:.1f} ms = generate {s['generate_ms']:.1f} + update {s['update_ms']:.1f}; model "
            f"forwards (with sampling) and backward {model:.1f} ms, the rest (klrl, AdamW, I/O) "
            f"{s['step_ms'] - model:.1f} ms; one forward: {r['model_forward']['forward']['one_token_ms']:.2f} ms at "
            f"1 token, {r['model_forward']['forward']['batch_ms']:.2f} ms at {r['model_forward']['rows']} x "
            f"{r['model_forward']['tokens']} tokens")


def main() -> None:
    from klrl.errors import ConfigError

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=WORKLOADS, default="tiny")
    ap.add_argument("--pairing", choices=PAIRINGS, default="grpo_k3_loss")
    ap.add_argument("--threads", type=THREADS, default=1)
    ap.add_argument("--steps", type=COUNT, default=40, help="timed steps, after 5 warm-up steps")
    ap.add_argument("--out", default=str(RESULTS / "step_breakdown.json"),
                    help="the JSON file, merged into (default: the committed results the README quotes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra klrl config overrides (recorded in the entry)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = {**WORKLOADS[a.model], "overrides": list(a.set)}
    with tempfile.TemporaryDirectory(prefix="step_breakdown-") as tmp:
        try:
            stepper = KlrlStepper(w, a.pairing, a.threads, Path(tmp))
        except ConfigError as e:
            ap.error(f"--set: {e}")
        torch.manual_seed(0)
        r = {"klrl_overrides": list(a.set), "sections": sections(stepper, a.steps)}
        rows, tokens = stepper.collect().rollout.input_ids.shape  # a batch: its rows, prompt + response tokens
        r["model_forward"] = {"rows": int(rows), "tokens": int(tokens), **forward_cost(stepper.p.model, rows, tokens)}
        stepper.close()
    r.update(machine=machine(), measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    path = Path(a.out)
    res = json.loads(path.read_text()) if path.exists() else {}
    res[f"{a.model}/{a.pairing}/threads={a.threads}"] = r
    if path.resolve() == (RESULTS / "step_breakdown.json").resolve():
        save(res, "step_breakdown")
    else:
        path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(r, indent=2))
    print(summary_line(r))


if __name__ == "__main__":
    main()
