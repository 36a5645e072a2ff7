#!/usr/bin/env python3
"""klrl's side of the GPU kit: the workload of workload.py through klrl's own generate and update (via
klrl_adapter.py, the kit's only klrl import), warm-up + measured steps; writes one JSON file (--out).

    python benchmarks/gpu/klrl_bench.py --shape qwen2.5-0.5b --out out/klrl_05b.json
    python benchmarks/gpu/klrl_bench.py --shape smoke --device cpu --prompt-len 16 --new-tokens 8 --out /tmp/k.json

Setup as klrl.trainer.train does it: the reference is a copy of the policy (bf16); --precision mixed shards both
FSDP-of-1 (float32 masters, bf16 compute), --precision bf16 keeps bf16 weights. Models are initialised on the
device itself (setup only; not timed). Per step: generate (klrl's hf backend) and update (klrl's `update`: policy
and reference forward, loss, backward, clip, AdamW step, generator sync), each timed with its own peak memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from workload import (PRECISIONS, SHAPES, Clock, add_workload_args, device_name, model_config,  # noqa: E402
                      step_figures, write_result)


def log(msg: str) -> None:
    print(f"[klrl_bench] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    a = ap.parse_args()
    t_start = time.perf_counter()
    mixed = a.precision == "mixed"
    B = a.prompts * a.group
    res = {"framework": "klrl", "bench": "klrl_bench", "status": "setup", "shape": a.shape, "precision": a.precision,
           "precision_detail": PRECISIONS[a.precision] + (" (FSDP of 1), bf16 reference" if mixed else ""),
           "device": device_name(a.device), "sequences": B, "prompts": a.prompts, "group": a.group,
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "micro_batch": a.micro, "beta": a.beta,
           "warmup_steps": a.warmup}
    write_result(a.out, res)

    from transformers import AutoModelForCausalLM

    from klrl_adapter import KlrlStep  # the kit's only klrl import

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    mc = model_config(a.shape)
    with device:  # initialise on the device: seconds instead of a CPU init of billions of weights
        model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32 if mixed else torch.bfloat16)
    ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    res["params"] = sum(p.numel() for p in model.parameters())
    k = KlrlStep(model, ref, device, mixed=mixed, group=a.group, prompts=a.prompts, micro=a.micro, beta=a.beta,
                 lr=a.lr)
    res["klrl"] = k.describe()
    gen = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(3, SHAPES[a.shape]["vocab_size"], (B, a.prompt_len), generator=gen).tolist()
    clock = Clock(a.device)
    res["setup_s"] = round(time.perf_counter() - t_start, 1)
    log(f"{a.shape} {a.precision}: {res['params']:,} params on {res['device']}, setup {res['setup_s']}s")

    rows = []
    for i in range(a.warmup + a.steps):
        t0 = clock.start()
        ro = k.generate(prompts, a.new_tokens)
        t_gen, gen_peak = clock.stop(t0)
        n_tok = k.response_tokens(ro)
        rewards = (torch.rand(B, generator=gen) < 0.5).float()
        t0 = clock.start()
        rec = k.update(ro, rewards, t_gen)
        t_train, train_peak = clock.stop(t0)
        rows.append({"generate_s": t_gen, "train_s": t_train, "tokens": n_tok, "grad_norm": rec["grad_norm"],
                     "generate_peak_gib": gen_peak, "train_peak_gib": train_peak})
        log(f"step {i + 1}{' (warm-up)' if i < a.warmup else ''}: generate {t_gen:.3f}s update {t_train:.3f}s "
            f"tokens {n_tok} grad_norm {rec['grad_norm']:.3g}")
        done = i + 1 == a.warmup + a.steps
        res.update(step_figures(rows, a.warmup), status="ok" if done else "partial",
                   first_step={kk: round(v, 3) if isinstance(v, float) else v for kk, v in rows[0].items()},
                   total_wall_s=round(time.perf_counter() - t_start, 1))
        write_result(a.out, res)
    k.close()
    res["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    write_result(a.out, res)
    log(f"done: step {res['step_s']}s, generate {res['generate_tokens_per_s']} tok/s, "
        f"train {res['train_tokens_per_s']} tok/s")


if __name__ == "__main__":
    main()
