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

from report import RESULTS, machine, save  # benchmarks/report.py
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

    def timed_backward(self, *a, **k):
        t0 = time.perf_counter()
        backward(self, *a, **k)
        t["update: backward"] = t.get("update: backward", 0.0) + time.perf_counter() - t0

    torch.Tensor.backward = timed_backward
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
    out = {"shape": [batch, length]}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        with FlopCounterMode(display=False) as fc:
            fn(full)
        ms = median_ms(lambda: fn(full))
        out[name] = {"one_token_ms": round(median_ms(lambda: fn(one)), 3), "batch_ms": round(ms, 3),
                     "batch_gflops": round(fc.get_total_flops() / ms / 1e6, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=WORKLOADS, default="tiny")
    ap.add_argument("--pairing", choices=PAIRINGS, default="grpo_k3_loss")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS / "step_breakdown.json"), help="the JSON file, merged into")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra klrl config overrides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = {**WORKLOADS[a.model], "overrides": list(a.set)}
    stepper = KlrlStepper(w, a.pairing, a.threads, Path(tempfile.mkdtemp(prefix="step_breakdown-")))
    torch.manual_seed(0)
    r = {"sections": sections(stepper, a.steps)}
    width = int(stepper.collect().rollout.input_ids.shape[1])  # prompt + response tokens of a batch
    r["model_forward"] = forward_cost(stepper.p.model, w["prompts"] * w["group"], width)
    r.update(machine=machine(), measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    path = Path(a.out)
    res = json.loads(path.read_text()) if path.exists() else {}
    res[f"{a.model}/{a.pairing}/threads={a.threads}"] = r
    if path.resolve() == (RESULTS / "step_breakdown.json").resolve():
        save(res, "step_breakdown")
    else:
        path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
