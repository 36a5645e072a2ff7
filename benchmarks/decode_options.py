"""Generation alone, on the vs_trl.py workloads' shapes: klrl's decoding loop (klrl.sampling.rollout.decode, dynamic
KV cache, float32) against the options that could make the model's own execution faster: transformers' static KV
cache, torch.compile of the forward, bfloat16 weights. Writes benchmarks/results/decode_options.json (merged).

    python benchmarks/decode_options.py --model tiny --threads 1
    python benchmarks/decode_options.py --model smollm2 --threads 2 --new-tokens 16

Per option: ms per decoded token = (time for L tokens - time for 1 token) / (L - 1), the prefill taken out, median
of --reps runs after one warm-up run (whose time, compilation included, is reported as first_call_s); and whether
its tokens equal the baseline's: sampled with the same seed (float32 options), greedy (all options; for bfloat16
the share of greedy tokens equal to float32's). The memory-bandwidth floor of a decode step: every weight read
once, at the bandwidth of a large tensor copy on this machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time

import torch

from report import RESULTS, THREADS, machine, save  # benchmarks/report.py
from vs_trl import WORKLOADS, bench_prompts, compose_config


def bandwidth(threads: int, gib: float = 1.0) -> dict:
    """GB/s of a large float32 copy (bytes read + written) and of a large read (x.sum()), best of 5."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30 / 4))
    y = torch.empty_like(x)
    y.copy_(x), x.sum()
    best = lambda fn: min(_time(fn) for _ in range(5))  # noqa: E731
    nbytes = x.numel() * 4
    return {"copy_gb_per_s": round(2 * nbytes / best(lambda: y.copy_(x)) / 1e9, 1),
            "read_gb_per_s": round(nbytes / best(x.sum) / 1e9, 1)}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def workload_inputs(model_name: str, threads: int):
    """The model (built as klrl builds it), and step 0's prompts repeated per sample, left-padded."""
    from klrl.sampling.rollout import encode_prompts, end_ids, left_pad
    from klrl.training.setup import build

    w = WORKLOADS[model_name]
    cfg = compose_config(w, "grpo_k3_loss", threads)
    p = build(cfg)
    torch.set_num_threads(threads)
    per_step, _ = bench_prompts(cfg, w["prefix"], 1)
    enc = encode_prompts(p.tokenizer, [q.prompt for q in per_step[0]], bool(cfg.model.chat_template))
    ids, attn = left_pad(enc, p.tokenizer.pad_token_id)
    ids, attn = ids.repeat_interleave(w["group"], 0), attn.repeat_interleave(w["group"], 0)
    return p.model.eval(), ids, attn, p.tokenizer.pad_token_id, end_ids(p.model, p.tokenizer), w


def static_decode(model, ids, attn, L, pad, ends, greedy):
    """klrl's decode, the KV cache a transformers StaticCache (preallocated to prompt + L) instead of dynamic."""
    from transformers import StaticCache

    from klrl.sampling import prefix, rollout

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + L)
    key = prefix.cache_key(model)
    fwd = model.forward

    @functools.wraps(fwd)  # keeps forward's signature: decode picks its cache keyword from it
    def with_cache(*a, **kw):  # the first (prefill) call gets the static cache; later ones pass it on
        kw.setdefault(key, cache)
        return fwd(*a, **kw)

    model.forward = with_cache
    try:
        return rollout.decode(model, ids, attn, L, pad, ends, greedy=greedy, want_logp=True, min_new_tokens=L)
    finally:
        del model.forward


def hf_generate(model, ids, attn, L, pad, ends, greedy, **kw):
    """transformers' generate with the same sampling settings (the reference klrl's decode reproduces)."""
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=L, min_new_tokens=L,
                         do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad,
                         eos_token_id=list(ends), **kw)
    return out[:, ids.shape[1]:], None


def options(model) -> dict:
    """name -> (model to run, generate function). Compiled and bfloat16 models are copies."""
    from transformers import CompileConfig

    from klrl.sampling.rollout import decode

    def klrl(m, ids, attn, L, pad, ends, greedy):
        return decode(m, ids, attn, L, pad, ends, greedy=greedy, want_logp=True, min_new_tokens=L)

    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    cc = CompileConfig(dynamic=None, mode="default")
    cc._compile_all_devices = True
    return {
        "klrl_decode_fp32": (model, klrl),
        "hf_generate_dynamic": (model, hf_generate),
        "hf_generate_static": (model, lambda *a: hf_generate(*a, cache_implementation="static")),
        "hf_generate_static_compiled": (
            model, lambda *a: hf_generate(*a, cache_implementation="static", compile_config=cc)),
        "klrl_decode_static": (model, static_decode),
        "klrl_decode_compiled": (compiled, klrl),
        "klrl_decode_bf16": (copy.deepcopy(model).to(torch.bfloat16), klrl),
    }


def runner(model, gen, ids, attn, pad, ends):
    def run(n, greedy=False, seed=0):
        torch.manual_seed(seed)
        with torch.no_grad():
            tokens, lp = gen(model, ids, attn, n, pad, ends, greedy)
            return tokens, lp
    return run


def measure(runs: dict, L: int, reps: int) -> dict:
    """Per option, after a warm-up: `reps` rounds in which every option generates L tokens and 1 token in turn (so
    machine load hits all alike); ms per decoded token from the medians (and from the best times)."""
    res, times = {name: {} for name in runs}, {name: ([], []) for name in runs}
    for run in runs.values():
        run(L), run(1)
    for _ in range(reps):
        for name, run in runs.items():
            times[name][0].append(_time(lambda: run(L)))
            times[name][1].append(_time(lambda: run(1)))
    for name, (tl, t1) in times.items():
        tL, tP = statistics.median(tl), statistics.median(t1)
        res[name].update(generate_s=round(tL, 4), prefill_s=round(tP, 4),
                         ms_per_token=round(1e3 * (tL - tP) / (L - 1), 2),
                         ms_per_token_best=round(1e3 * (min(tl) - min(t1)) / (L - 1), 2))
    return res


def compare(runs: dict, L: int, base: str) -> dict:
    """Tokens against the baseline's: sampled at seed 0 (equal for exact float32 options), and greedy; and where
    the option's loop reports them, the sampled tokens' log-probs (bitwise equal, or the largest difference)."""
    out = {name: (run(L), run(L, greedy=True)) for name, run in runs.items()}
    (bs, blp), (bg, _) = out[base]
    res = {}
    for name, ((s, lp), (g, _)) in out.items():
        res[name] = {"sampled_tokens_identical": bool(torch.equal(s, bs)),
                     "greedy_tokens_identical": bool(torch.equal(g, bg)),
                     "greedy_tokens_equal_share": round(float((g == bg).float().mean()), 4)}
        if lp is not None and s.shape == bs.shape:
            res[name]["sampled_logp_bitwise_equal"] = bool(torch.equal(lp.float(), blp))
            res[name]["sampled_logp_max_abs_diff"] = float((lp.float() - blp).abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=WORKLOADS, default="tiny")
    ap.add_argument("--threads", type=THREADS, default=1)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the workload's")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the options (the baseline always runs)")
    a = ap.parse_args()
    model, ids, attn, pad, ends, w = workload_inputs(a.model, a.threads)
    L = a.new_tokens or w["new_tokens"]
    bw = bandwidth(a.threads)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res = {"model": a.model, "threads": a.threads, "batch": list(ids.shape), "new_tokens": L, **bw,
           "weight_bytes": n_bytes, "bandwidth_floor_ms_per_token": round(1e3 * n_bytes / (bw["read_gb_per_s"] * 1e9), 2),
           "options": {}}
    print(json.dumps({k: v for k, v in res.items() if k != "options"}), flush=True)
    base = "klrl_decode_fp32"
    runs = {}
    for name, (m, gen) in options(model).items():
        if a.only is None or name == base or name in a.only:
            runs[name] = runner(m, gen, ids, attn, pad, ends)
    first = {}
    for name, run in list(runs.items()):  # an option that does not run here is a finding, not a crash
        try:
            first[name] = _time(lambda: run(2))  # compilation included
        except Exception as e:
            res["options"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {name:28s} failed: {res['options'][name]['error']}", flush=True)
            del runs[name]
    timed, same = measure(runs, L, a.reps), compare(runs, L, base)
    for name in runs:
        r = res["options"][name] = {"first_call_s": round(first[name], 2), **timed[name], **same[name]}
        r["speedup_vs_klrl_decode"] = round(timed[base]["ms_per_token"] / r["ms_per_token"], 3)
        print(f"  {name:28s} {r}", flush=True)
    res["machine"], res["measured_at"] = machine(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    path = RESULTS / "decode_options.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[f"{a.model}/threads={a.threads}"] = res
    save(allres, "decode_options")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
