"""The floor under a trainer that runs the model once per row (as TRL does) on the vs_trl.py workload: the bare
torch work such a step cannot avoid, with no trainer around it, timed in turns with klrl's and TRL's steps on the same weights and prompts. Writes
benchmarks/results/floor.json (one entry per model x pairing x threads, merged into what is there; --out another file).

    python benchmarks/floor.py --model tiny --pairing all --steps 40 --threads 1

The floor step, written out here in plain torch + the transformers model forward:
  1. sampling: left-padded prompts (tokenized once, outside the timing), prefill with the KV cache, then one model
     forward per new token, a `torch.multinomial` draw from softmax(logits) (end ids masked until max_new_tokens,
     as both trainers are run in vs_trl.py), no log-prob bookkeeping;
  2. policy forward over prompt + response with grad (LM head on the response positions only), log_softmax and
     gather of the sampled tokens;
  3. the reference's forward on the same, under no_grad;
  4. the pairing's loss in a few tensor ops (GRPO: group-normalised advantage, ratio, beta * k3 per token; RLOO:
     beta * k1 summed into the reward, leave-one-out baseline), backward, gradient clipping, one AdamW step.
klrl goes under this floor by doing less model work: a group's rows share one forward over their prompt
(klrl.sampling.prefix), in the prefill and in both log-prob passes.
Left out because they are not model execution: decoding tokens to text, scoring, logging. Rewards here are a
cheap function of the sampled tokens (the loss needs non-constant values, not the task's).

A step's time: generation + update, as vs_trl.py times klrl's and TRL's. Three processes (floor, klrl, TRL) take
turns step by step, the order rotating every step, so machine load hits all three alike. TRL / floor is the best
ratio any trainer could reach against TRL without making the model's own execution faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

from report import COUNT, NONNEG, RESULTS, THREADS, machine, save  # benchmarks/report.py
from vs_trl import (BETA, PAIRINGS, WORKLOADS, bench_prompts, compose_config, expect, finish_workers, ratio_stats,
                    set_threads, start_workers, stop_workers)


class FloorStepper:
    """The bare step on the exported weights (the same checkpoint TRL loads), prompts as klrl draws them."""

    def __init__(self, workload: dict, pairing: str, threads: int, model_dir: str, steps: int, optim: dict):
        import copy

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from klrl.sampling.rollout import encode_prompts, end_ids, left_pad

        cfg = compose_config(workload, pairing, threads)
        per_step, _ = bench_prompts(cfg, workload["prefix"], steps + 2)
        tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]),
                                     eps=optim["eps"], weight_decay=optim["weight_decay"])
        self.clip = optim["grad_clip"]
        G, chat = workload["group"], bool(cfg.model.chat_template)
        self.prompts = []
        for ps in per_step:
            ids, attn = left_pad(encode_prompts(tok, [p.prompt for p in ps], chat), tok.pad_token_id)
            self.prompts.append((ids.repeat_interleave(G, 0), attn.repeat_interleave(G, 0)))
        self.ends = torch.tensor(end_ids(self.model, tok))
        self.G, self.L, self.algo = G, workload["new_tokens"], PAIRINGS[pairing]["trl"]
        self.step_no = 0

    def sample(self, ids, attn):
        """[B, L] tokens: prefill, then one forward per token with the KV cache."""
        import torch

        from klrl.sampling.prefix import cache_key  # `cache` (transformers >= 5.2x) or `past_key_values`

        key = cache_key(self.model)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache, nxt, toks = getattr(out, key), pos[:, -1:], []
            for t in range(self.L):
                scores = out.logits[:, -1, :].float()
                scores[:, self.ends] = float("-inf")
                tok = torch.multinomial(torch.softmax(scores, -1), 1)
                toks.append(tok)
                if t + 1 == self.L:
                    break
                attn, nxt = torch.cat([attn, torch.ones_like(tok)], -1), nxt + 1
                out = self.model(input_ids=tok, attention_mask=attn, position_ids=nxt, use_cache=True,
                                 **{key: cache})
                cache = getattr(out, key)
        return torch.cat(toks, -1)

    def logprobs(self, model, ids, attn):
        """[B, L] log-probs of the response tokens (the last L of ids) under model."""
        import torch

        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=self.L + 1).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -self.L:, None]).squeeze(-1)

    def loss(self, logp, ref_lp, rewards):
        B, G = rewards.shape[0], self.G
        r = rewards.view(B // G, G)
        if self.algo == "grpo":
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(B, 1)
            d = ref_lp - logp
            per_tok = -(logp - logp.detach()).exp() * adv + BETA * (d.exp() - d - 1)
            return per_tok.mean(-1).mean()
        r = r - BETA * (logp.detach() - ref_lp).sum(-1).view(B // G, G)
        adv = (r - (r.sum(1, keepdim=True) - r) / (G - 1)).view(B)
        return -(adv * logp.sum(-1)).mean()

    def step(self) -> dict:
        import torch

        ids, attn = self.prompts[self.step_no]
        t0 = time.perf_counter()
        resp = self.sample(ids, attn)
        t_gen = time.perf_counter() - t0
        full, full_attn = torch.cat([ids, resp], -1), torch.cat([attn, torch.ones_like(resp)], -1)
        rewards = (resp % 3 == 0).float().mean(-1)  # cheap, varies between samples
        logp = self.logprobs(self.model, full, full_attn)
        with torch.no_grad():
            ref_lp = self.logprobs(self.ref, full, full_attn)
        self.loss(logp, ref_lp, rewards).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return {"generate_s": t_gen, "generated_tokens": int(resp.numel()), "sequences": int(resp.shape[0])}


def floor_worker(conn, workload: dict, pairing: str, threads: int, model_dir: str, steps: int, optim: dict) -> None:
    try:
        set_threads(threads)
        stepper = FloorStepper(workload, pairing, threads, model_dir, steps, optim)
        import torch

        torch.manual_seed(0)
        conn.send(("ready", {}))
        while conn.recv() != "stop":
            t0, c0 = time.perf_counter(), time.process_time()
            rec = stepper.step()
            rec.update(total_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                       threads=torch.get_num_threads())
            conn.send(("done", rec))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def alternate3(sides: dict, steps: int) -> dict[str, list[dict]]:
    """`steps` steps on each side in turns, the order rotating each step (f k T, k T f, T f k, ...)."""
    names = list(sides)
    recs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(steps):
        for name in names[i % 3:] + names[: i % 3]:
            conn, proc = sides[name]
            conn.send("go")
            recs[name].append(expect(conn, proc, "done"))
        f, k, t = (recs[n][-1]["total_s"] for n in ("floor", "klrl", "trl"))
        print(f"  step {i:3d}  floor {f:7.3f} s  klrl {k:7.3f} s  trl {t:7.3f} s", flush=True)
    finish_workers(sides)
    return recs


def run_floor(model: str, pairing: str, steps: int, threads: int, warmup: int, overrides=()) -> dict:
    import multiprocessing as mp

    workload = {**WORKLOADS[model], "overrides": list(overrides)}
    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="floor-"))
    sides: dict = {}
    try:
        sides, kinfo = start_workers(ctx, tmp, workload, pairing, steps, threads)
        f_conn, f_child = ctx.Pipe()
        fp = ctx.Process(target=floor_worker, name="floor", args=(f_child, workload, pairing, threads,
                                                                    str(tmp / "model"), steps, kinfo["cfg_optim"]))
        fp.start()
        sides = {"floor": (f_conn, fp), **sides}
        expect(f_conn, fp, "ready")
        recs = alternate3(sides, steps)
    finally:
        stop_workers([proc for _, proc in sides.values()])
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize(model, pairing, steps, threads, warmup, recs)


def summarize(model: str, pairing: str, steps: int, threads: int, warmup: int, recs: dict) -> dict:
    col = lambda name, key: [r[key] for r in recs[name][warmup:]]  # noqa: E731
    ms = lambda name, key: 1e3 * statistics.median(col(name, key))  # noqa: E731
    side = lambda n: {"step_ms": ms(n, "total_s"), "step_cpu_ms": ms(n, "cpu_s"),  # noqa: E731
                      "generate_ms": ms(n, "generate_s"), "step_ms_min": 1e3 * min(col(n, "total_s"))}
    return {
        "model": model, "pairing": pairing, "threads": threads, "steps": steps, "warmup_steps_dropped": warmup,
        "floor": side("floor"), "klrl": side("klrl"), "trl": side("trl"),
        "same_generated_tokens": recs["floor"][0]["generated_tokens"] == recs["klrl"][0]["generated_tokens"],
        # the best TRL/trainer ratio reachable without faster model execution, and where each trainer stands
        "trl_over_floor": ratio_stats(col("trl", "total_s"), col("floor", "total_s")),
        "klrl_over_floor": ratio_stats(col("klrl", "total_s"), col("floor", "total_s")),
        "trl_over_klrl": ratio_stats(col("trl", "total_s"), col("klrl", "total_s")),
        "cpu_trl_over_floor": ratio_stats(col("trl", "cpu_s"), col("floor", "cpu_s")),
        "cpu_klrl_over_floor": ratio_stats(col("klrl", "cpu_s"), col("floor", "cpu_s")),
        "per_step_s": {n: [r["total_s"] for r in rs] for n, rs in recs.items()},
    }


def report(r: dict) -> None:
    f, k, t = r["floor"], r["klrl"], r["trl"]
    print(f"  floor {f['step_ms']:.1f} ms (generate {f['generate_ms']:.1f}), klrl {k['step_ms']:.1f} ms (generate "
          f"{k['generate_ms']:.1f}), TRL {t['step_ms']:.1f} ms (generate {t['generate_ms']:.1f})")
    for key in ("trl_over_floor", "klrl_over_floor", "trl_over_klrl", "cpu_trl_over_floor", "cpu_klrl_over_floor"):
        s = r[key]
        print(f"  {key:20s} {s['ratio_of_medians']:.2f} (95% CI {s['ci95_bootstrap'][0]:.2f}-"
              f"{s['ci95_bootstrap'][1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=WORKLOADS, default="tiny")
    ap.add_argument("--pairing", choices=[*PAIRINGS, "all"], default="all")
    ap.add_argument("--steps", type=COUNT, default=40)
    ap.add_argument("--threads", type=THREADS, default=1)
    ap.add_argument("--warmup", type=NONNEG, default=None, help="steps dropped (default 5, or 1 when --steps < 10)")
    ap.add_argument("--out", default=str(RESULTS / "floor.json"), help="the JSON file, merged into")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra klrl config overrides")
    a = ap.parse_args()
    warmup = a.warmup if a.warmup is not None else 5 if a.steps >= 10 else 1
    if a.steps <= warmup:
        ap.error(f"--steps must exceed the {warmup} warm-up steps")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    path = Path(a.out)
    res = json.loads(path.read_text()) if path.exists() else {}
    for pairing in list(PAIRINGS) if a.pairing == "all" else [a.pairing]:
        print(f"{a.model} / {pairing} / {a.threads} thread(s), {a.steps} steps (first {warmup} dropped)", flush=True)
        r = run_floor(a.model, pairing, a.steps, a.threads, warmup, a.set)
        r["machine"], r["measured_at"] = machine(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        res.setdefault("runs", {})[f"{a.model}/{pairing}/threads={a.threads}"] = r
        if path.resolve() == (RESULTS / "floor.json").resolve():
            save(res, "floor")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2) + "\n")
        report(r)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
