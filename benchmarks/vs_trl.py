"""klrl against Hugging Face TRL on identical work: the ratio TRL-time / klrl-time per training step (above 1 = klrl
faster), with its spread. Writes benchmarks/results/vs_trl.json (one entry per model x pairing x threads, merged
into what is there; --out another file).

    python benchmarks/vs_trl.py --model tiny --pairing all --steps 60 --threads 1
    python benchmarks/vs_trl.py --model smollm2 --pairing all --steps 12 --threads 2

TRL is a benchmark dependency only: `pip install -c constraints.txt -e '.[bench]'`.

Pairings (same model weights, batch, lengths, beta, optimizer and learning rate on both sides):
  grpo_k3_loss    klrl algo=grpo estimator=k3 placement=loss   vs TRL GRPOTrainer, beta>0 (its per-token k3 in the
                  loss), loss_type="grpo" (per-sequence token mean, then mean over sequences = klrl's
                  seq_mean_token_mean, algo=grpo's aggregation), scale_rewards="group" (klrl's grpo baseline),
                  use_bias_correction_kl=False (klrl placement=loss adds beta*k3 unweighted).
  rloo_k1_reward  klrl algo=rloo estimator=k1 placement=reward vs TRL RLOOTrainer, beta>0 (k1 summed per sequence,
                  subtracted from the reward before the leave-one-out baseline), normalize_advantages=False.
Workloads:
  tiny     klrl's embedded tiny Llama + character tokenizer (warm-started by klrl, exported to a directory for
           TRL), arith prompts, 8 prompts x 8 samples x 8 new tokens.
  smollm2  SmolLM2-135M-Instruct (klrl's smollm2 source, exported likewise), arith prompts behind a fixed
           instruction (64 prompt tokens under the chat template), 4 prompts x 4 samples x 64 new tokens.
Both sides sample at temperature 1 (top_p 1, top_k 0) in float32 with EOS suppressed until max_new_tokens (klrl:
`min_new_tokens`, TRL: generation_kwargs min_new_tokens), so every response has exactly that many tokens; TRL gets
klrl's prompts, in klrl's order, so both sides see the same prompts at the same step.

The two trainers live in two processes that take turns step by step (order alternating per pair: k T, T k, ...),
coordinated by the parent over pipes; TRL blocks in a `TrainerCallback.on_step_begin`. A step's time is everything
between two turns: for TRL from one `on_step_begin` to the next (generation, reference pass, loss, optimizer,
logging, data loading), for klrl what its trainer loop runs per step: the batch source's `get` (sample, decode,
score), `update`, `publish` (the generator sync) and the metrics record. Machine noise hits both alike, so the
ratio holds up on a loaded box even when the absolute times do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from report import COUNT, NONNEG, RESULTS, THREADS, machine, save  # benchmarks/report.py

PAIRINGS = {
    "grpo_k3_loss": {"klrl": ["algo=grpo", "estimator=k3", "placement=loss"], "trl": "grpo"},
    "rloo_k1_reward": {"klrl": ["algo=rloo", "estimator=k1", "placement=reward"], "trl": "rloo"},
}
# 64 tokens of prompt under SmolLM2's chat template (its default system message included) with an a+b= question.
SMOL_PREFIX = ("You are checking a calculator. Add the two whole numbers below and reply with their sum only: "
               "digits, no words, no spaces.\n")
WORKLOADS = {
    "tiny": {"model": "tiny", "prompts": 8, "group": 8, "new_tokens": 8, "lr": 1e-4, "prefix": ""},
    "smollm2": {"model": "smollm2-135m", "prompts": 4, "group": 4, "new_tokens": 64, "lr": 1e-6, "prefix": SMOL_PREFIX},
}
BETA = 0.1
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# klrl's side: the trainer's own parts (klrl.training.setup.build / make_source, klrl.training.update.update).
# ----------------------------------------------------------------------------------------------------------------


class BenchTask:
    """klrl's arith task with an optional fixed instruction in front of each prompt, and a reward that still varies
    when every response is forced to max_new_tokens (arith's exact match would then give 0 everywhere: no
    gradient, the policy never leaves the reference, KL stays 0): 1 if the answer appears in the response, plus
    0.1 x its share of digits. Both sides score with it."""

    def __init__(self, task, prefix: str):
        self._task, self._prefix = task, prefix

    def sample_train(self, rng, n):
        return [dataclasses.replace(p, prompt=self._prefix + p.prompt) for p in self._task.sample_train(rng, n)]

    def score(self, problem, completion: str) -> float:
        digits = sum(c.isdigit() for c in completion) / max(len(completion), 1)
        return float(problem.answer in completion) + 0.1 * digits

    def __getattr__(self, name):
        return getattr(self._task, name)


class FixedLength:
    """A klrl generator whose responses all run to max_new_tokens (end ids suppressed until then): the same number
    of tokens on both sides, whatever the policy samples."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
        return self.inner.generate(prompt_ids, max_new_tokens, temperature, top_p, greedy,
                                   min_new_tokens=max_new_tokens)

    def sync(self, model) -> None:
        self.inner.sync(model)

    def close(self) -> None:
        self.inner.close()


def compose_config(workload: dict, pairing: str, threads: int):
    from klrl.cli.compose import compose

    overrides = [
        f"model={workload['model']}", "task=arith", *PAIRINGS[pairing]["klrl"], f"beta={BETA}", f"seed={SEED}",
        f"algo.prompts_per_step={workload['prompts']}", f"algo.group_size={workload['group']}",
        f"task.max_new_tokens={workload['new_tokens']}", f"optim.lr={workload['lr']}",
        "generation.backend=hf", "generation.temperature=1.0", "generation.top_p=1.0", "device=cpu",
        "progress=false", "logger=none", *workload.get("overrides", []),
    ]
    if workload["model"] == "tiny":
        overrides.append(f"model.cpu_threads={threads}")
    return compose(overrides)


def bench_prompts(cfg, prefix: str, steps: int):
    """The problems klrl's `collect` draws at steps 0..steps-1 (same seeds), and the task that scores them."""
    import random

    from klrl.sampling.batch import step_seed
    from klrl.tasks import TASKS

    task = BenchTask(TASKS[cfg.task.name](cfg.task, cfg.seed), prefix)
    per_step = [task.sample_train(random.Random(step_seed(cfg.seed, s)), cfg.algo.prompts_per_step)
                for s in range(steps)]
    return per_step, task


class KlrlStepper:
    """One klrl training step per `step()`: what `klrl.training.trainer.train`'s loop runs (batch source `get`,
    `update`, `publish`, the metrics record), on the parts it builds for the same config."""

    def __init__(self, workload: dict, pairing: str, threads: int, run_dir: Path):
        import torch

        from klrl.config.specs import kl_spec, pg_spec
        from klrl.runs.rundir import RunDir
        from klrl.sampling.generation import make_generator
        from klrl.training.loggers import make_loggers
        from klrl.training.setup import build, make_source
        from klrl.training.update import update

        self.cfg = cfg = compose_config(workload, pairing, threads)
        self.p = p = build(cfg)
        torch.set_num_threads(threads)
        p.task = BenchTask(p.task, workload["prefix"])
        self.generator = FixedLength(make_generator(cfg, p.model, p.tokenizer))
        self.source = make_source(cfg, p, self.generator, 0)
        self.kl, self.pg, self._update = kl_spec(cfg), pg_spec(cfg), update
        run_dir.mkdir(parents=True, exist_ok=True)
        self.logs = make_loggers(cfg, RunDir(run_dir), 0, True, {})
        self.step_no = 0
        if workload.get("compile"):  # a what-if (--compile), not a klrl option: both models' forwards compiled
            for m in (p.model, p.ref):
                m.forward = torch.compile(m.forward, dynamic=True)

    def close(self) -> None:
        """Flush and close the metrics sinks (a context manager in newer klrl, `close()` in older)."""
        close = getattr(self.logs, "close", None)
        close() if close else self.logs.__exit__(None, None, None)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.p.model.parameters())

    def export(self, path: Path) -> None:
        """The exact weights and tokenizer klrl trains, as a transformers checkpoint for TRL."""
        self.p.model.save_pretrained(path)
        self.p.tokenizer.save_pretrained(path)

    def collect(self):
        """The step's batch, from the trainer's batch source (sample, decode, score)."""
        return self.source.get(self.step_no)

    def update(self, batch) -> dict:
        """`update`, the source's `publish` and the metrics record, as the trainer loop runs them."""
        s, p, cfg = self.step_no, self.p, self.cfg
        rec = self._update(batch, cfg, p.model, p.ref, p.optimizer, p.scheduler, self.kl, self.pg, p.dist,
                           extras=s % cfg.extras_every == 0)
        self.logs.write({"step": s + 1, "kind": "train", **rec, **batch.stats, **self.source.publish(s, p.model)})
        self.step_no += 1
        return rec

    def step(self) -> dict:
        batch = self.collect()
        t0 = time.perf_counter()
        rec = self.update(batch)
        return describe_klrl(batch, rec, self.cfg.beta, time.perf_counter() - t0)


def describe_klrl(batch, rec: dict, beta: float, t_update: float) -> dict:
    ro, n = batch.rollout, len(batch.rewards)
    gen_tok = int(ro.response_mask.sum().item())
    # The KL term's value as TRL logs it: per-token mean of k3 (in the loss) or k1 (in the reward).
    kl_seq = rec.get("loss/kl", rec.get("kl/reward_penalty", 0.0)) / beta
    return {
        "generate_s": batch.gen_time,
        "update_s": t_update,
        "sequences": n,
        "prompt_width": int(ro.prompt_len),
        "prompt_tokens": int(ro.attention_mask[:, : ro.prompt_len].sum().item()),
        "prompt_hash": digest(ro.input_ids[:, : ro.prompt_len]),
        "response_width": int(ro.responses.shape[1]),
        "generated_tokens": gen_tok,
        "kl_per_token": kl_seq * n / max(gen_tok, 1),
        "reward": rec["reward"],
    }


# ----------------------------------------------------------------------------------------------------------------
# The two worker processes.
# ----------------------------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def digest(ids) -> str:
    """A fingerprint of a batch of token ids (both sides' prompts, row by row, must match)."""
    import torch

    return hashlib.sha1(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def klrl_worker(conn, workload: dict, pairing: str, threads: int, export_dir: str) -> None:
    try:
        set_threads(threads)
        stepper = KlrlStepper(workload, pairing, threads, Path(export_dir).parent / "klrl_run")
        stepper.export(Path(export_dir))
        o = stepper.cfg.optim
        optim = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                 "grad_clip": o.grad_clip, "warmup_steps": o.warmup_steps}
        conn.send(("ready", {"params": stepper.n_params, "cfg_optim": optim,
                             "extras_every": stepper.cfg.extras_every,
                             "overrides": workload.get("overrides", []), "compile": bool(workload.get("compile"))}))
        import torch

        while conn.recv() != "stop":
            t0, c0 = time.perf_counter(), time.process_time()
            rec = stepper.step()
            rec["total_s"], rec["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            rec["threads"] = torch.get_num_threads()
            conn.send(("done", rec))
        stepper.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def trl_config(workload: dict, pairing: str, out_dir: str, steps: int, optim: dict):
    """TRL's GRPOConfig / RLOOConfig for the pairing, mirroring klrl's config, and the trainer class."""
    P, G, L = workload["prompts"], workload["group"], workload["new_tokens"]
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=L, max_steps=steps + 1,
        learning_rate=optim["lr"], adam_beta1=optim["betas"][0], adam_beta2=optim["betas"][1],
        adam_epsilon=optim["eps"], weight_decay=optim["weight_decay"], max_grad_norm=optim["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=optim["warmup_steps"],
        optim="adamw_torch",  # torch.optim.AdamW as klrl builds it
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=SEED, beta=BETA, num_iterations=1, temperature=1.0,
        top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": L}, shuffle_dataset=False,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    if PAIRINGS[pairing]["trl"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig(**common, loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False), GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig(**common, normalize_advantages=False), RLOOTrainer


def timed_trainer(base):
    """`base` (a TRL trainer class) recording, without changing what runs, generation time and the batch's shapes."""

    class Timed(base):
        bench: dict = {}

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            self.bench["generate_s"] = self.bench.get("generate_s", 0.0) + time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            cm, pm = out["completion_mask"], out["prompt_mask"]
            self.bench.update(sequences=int(cm.shape[0]), response_width=int(cm.shape[1]),
                              generated_tokens=int(cm.sum().item()), prompt_width=int(pm.shape[1]),
                              prompt_tokens=int(pm.sum().item()), prompt_hash=digest(out["prompt_ids"]))
            return out

    return Timed


def alternate_callback(conn, bench: dict):
    """A TrainerCallback that blocks before every step until the parent says go, reporting the previous step."""
    import torch
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        def __init__(self):
            self.t0 = self.c0 = None
            self.logs = {}

        def on_step_begin(self, args, state, control, **kw):
            now, cpu = time.perf_counter(), time.process_time()
            if self.t0 is None:
                conn.send(("ready", {"threads": torch.get_num_threads()}))
            else:
                conn.send(("done", {"total_s": now - self.t0, "cpu_s": cpu - self.c0, **bench,
                                    "threads": torch.get_num_threads(), "kl_per_token": self.logs.get("kl"),
                                    "reward": self.logs.get("reward"),
                                    "logged_mean_length": self.logs.get("completions/mean_length")}))
            bench.clear()
            self.logs = {}
            if conn.recv() == "stop":
                raise Stop
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.update(logs or {})

    return Alternate()


def trl_worker(conn, workload: dict, pairing: str, threads: int, model_dir: str, steps: int, optim: dict) -> None:
    try:
        set_threads(threads)
        from datasets import Dataset
        from transformers import AutoTokenizer, PrinterCallback

        cfg = compose_config(workload, pairing, threads)
        per_step, task = bench_prompts(cfg, workload["prefix"], steps + 2)
        problems = [p for ps in per_step for p in ps]
        chat = bool(cfg.model.chat_template)
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p.prompt}] if chat else p.prompt
                                                for p in problems], "idx": list(range(len(problems)))})

        def arith_reward(prompts, completions, idx, **kw):
            return [task.score(problems[i], c[-1]["content"] if isinstance(c, list) else c)
                    for c, i in zip(completions, idx)]

        args, base = trl_config(workload, pairing, str(Path(model_dir).parent / "trl_out"), steps, optim)
        Timed = timed_trainer(base)
        trainer = Timed(model=model_dir, reward_funcs=arith_reward, args=args, train_dataset=dataset,
                        processing_class=AutoTokenizer.from_pretrained(model_dir),
                        callbacks=[alternate_callback(conn, Timed.bench)])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's stand-in prints every log line
        try:
            trainer.train()
        except Stop:
            pass
    except BaseException:
        conn.send(("error", traceback.format_exc()))


# ----------------------------------------------------------------------------------------------------------------
# The parent: alternation, statistics, report.
# ----------------------------------------------------------------------------------------------------------------


def expect(conn, proc, tag: str, timeout: float = 3600.0):
    t_end = time.time() + timeout
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.exitcode}) while the benchmark waited for {tag!r}")
        if time.time() > t_end:
            raise TimeoutError(f"{proc.name}: no {tag!r} within {timeout:.0f} s")
    got, payload = conn.recv()
    if got == "error":
        raise RuntimeError(f"{proc.name} failed:\n{payload}")
    if got != tag:
        raise RuntimeError(f"{proc.name} sent {got!r}, expected {tag!r}")
    return payload


def ratio_stats(trl: list[float], klrl: list[float], n_boot: int = 5000, seed: int = 0) -> dict:
    """TRL/klrl as the ratio of the medians, with a 95% bootstrap CI (pairs resampled together), and the median
    and IQR of the per-pair ratios."""
    t, k = np.asarray(trl), np.asarray(klrl)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_boot, len(t)))
    boot = np.median(t[idx], axis=1) / np.median(k[idx], axis=1)
    per_pair = t / k
    q1, q3 = np.percentile(per_pair, [25, 75])
    return {
        "ratio_of_medians": float(np.median(t) / np.median(k)),
        "ci95_bootstrap": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
        "per_pair_median": float(np.median(per_pair)),
        "per_pair_iqr": [float(q1), float(q3)],
    }


def check_identical(k: list[dict], t: list[dict], workload: dict) -> dict:
    """Per step: same number of sequences, prompts, prompt and response widths, generated tokens; KL on both sides."""
    B, L = workload["prompts"] * workload["group"], workload["new_tokens"]
    same = lambda key: all(a[key] == b[key] for a, b in zip(k, t))  # noqa: E731
    later = slice(1, None)  # at step 0 the policy is the reference: KL = 0 exactly on both sides
    kl_med = lambda rs: statistics.median(abs(r["kl_per_token"] or 0) for r in rs[later]) if len(rs) > 1 else 0.0  # noqa: E731
    return {
        "sequences_per_step": [k[0]["sequences"], t[0]["sequences"]],
        "generated_tokens_per_step": [k[0]["generated_tokens"], t[0]["generated_tokens"]],
        "prompt_width": [k[0]["prompt_width"], t[0]["prompt_width"]],
        "same_sequences": same("sequences") and k[0]["sequences"] == B,
        "same_generated_tokens": same("generated_tokens") and all(r["generated_tokens"] == B * L for r in k),
        "same_response_width": same("response_width") and k[0]["response_width"] == L,
        "trl_logged_mean_length_is_max": all(r["logged_mean_length"] == L for r in t),  # TRL's own log says so too
        "same_prompt_width": same("prompt_width"),
        "same_prompt_tokens": same("prompt_tokens"),
        "same_prompts": same("prompt_hash"),
        "kl_nonzero_klrl": all(abs(r["kl_per_token"] or 0) > 0 for r in k[later]),
        "kl_nonzero_trl": all(abs(r["kl_per_token"] or 0) > 0 for r in t[later]),
        "kl_per_token_median": [kl_med(k), kl_med(t)],
        "threads": [k[0]["threads"], t[0]["threads"]],
    }


def identical_ok(idn: dict) -> bool:
    return all(v for key, v in idn.items() if key.startswith(("same_", "kl_nonzero", "trl_logged")))


def start_workers(ctx, tmp: Path, workload: dict, pairing: str, steps: int, threads: int):
    """klrl first (it builds the model and exports it), then TRL on the export; both ready for their first step."""
    k_conn, k_child = ctx.Pipe()
    t_conn, t_child = ctx.Pipe()
    kp = ctx.Process(target=klrl_worker, name="klrl", args=(k_child, workload, pairing, threads, str(tmp / "model")))
    kp.start()
    procs = [kp]
    try:
        kinfo = expect(k_conn, kp, "ready")
        tp = ctx.Process(target=trl_worker, name="trl",
                         args=(t_child, workload, pairing, threads, str(tmp / "model"), steps, kinfo["cfg_optim"]))
        tp.start()
        procs.append(tp)
        expect(t_conn, tp, "ready")
    except BaseException:
        stop_workers(procs)
        raise
    return {"klrl": (k_conn, kp), "trl": (t_conn, tp)}, kinfo


def stop_workers(procs) -> None:
    for proc in procs:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout=30)


def alternate(sides: dict, steps: int) -> dict[str, list[dict]]:
    """`steps` steps on each side, in turns (k T, T k, k T, ...). Ctrl-C (or SIGTERM) stops early: the pairs
    finished so far are kept and summarised."""
    recs: dict[str, list[dict]] = {"klrl": [], "trl": []}
    try:
        for i in range(steps):
            for name in ("klrl", "trl") if i % 2 == 0 else ("trl", "klrl"):
                conn, proc = sides[name]
                conn.send("go")
                recs[name].append(expect(conn, proc, "done"))
            k, t = recs["klrl"][-1], recs["trl"][-1]
            print(f"  step {i:3d}  klrl {k['total_s']:8.3f} s   trl {t['total_s']:8.3f} s   "
                  f"ratio {t['total_s'] / k['total_s']:5.2f}", flush=True)
    except KeyboardInterrupt:
        n = min(map(len, recs.values()))
        print(f"  interrupted: keeping the {n} finished pairs", flush=True)
        return {name: rs[:n] for name, rs in recs.items()}  # the workers are terminated by the caller
    finish_workers(sides)
    return recs


def finish_workers(sides: dict) -> None:
    """Ask every worker to stop after its last step, then wait for each (stop_workers is the hard stop)."""
    for conn, _ in sides.values():
        conn.send("stop")
    for _, proc in sides.values():
        proc.join(timeout=120)


def run_pairing(model: str, pairing: str, steps: int, threads: int, warmup: int, overrides=(),
                compile: bool = False) -> dict:
    import multiprocessing as mp

    workload = {**WORKLOADS[model], "overrides": list(overrides), "compile": compile}
    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    sides: dict = {}
    try:
        sides, kinfo = start_workers(ctx, tmp, workload, pairing, steps, threads)
        recs = alternate(sides, steps)
    finally:
        stop_workers([proc for _, proc in sides.values()])
        shutil.rmtree(tmp, ignore_errors=True)
    done = len(recs["klrl"])
    if done <= warmup:
        raise SystemExit(f"{model}/{pairing}: only {done} steps finished, none after the {warmup} warm-up steps")
    return {**summarize(model, pairing, done, threads, warmup, recs, kinfo), "interrupted": done < steps}


def summarize(model: str, pairing: str, steps: int, threads: int, warmup: int, recs: dict, kinfo: dict) -> dict:
    workload = WORKLOADS[model]
    k, t = recs["klrl"], recs["trl"]
    col = lambda rs, key: [r[key] for r in rs[warmup:]]  # noqa: E731
    med = lambda rs, key: statistics.median(col(rs, key))  # noqa: E731
    B, L = workload["prompts"] * workload["group"], workload["new_tokens"]
    return {
        "model": model, "pairing": pairing, "threads": threads, "steps": steps, "warmup_steps_dropped": warmup,
        "workload": {"prompts": workload["prompts"], "samples_per_prompt": workload["group"], "new_tokens": L,
                     "sequences": B, "params": kinfo["params"], "beta": BETA, "lr": kinfo["cfg_optim"]["lr"],
                     "klrl_extras_every": kinfo["extras_every"], "klrl_overrides": kinfo["overrides"],
                     "klrl_compiled": kinfo.get("compile", False)},
        "ratio_trl_over_klrl": ratio_stats(col(t, "total_s"), col(k, "total_s")),
        # The same from each process's CPU time (all its threads): less sensitive to other jobs on the machine,
        # though not immune (waiting threads spin).
        "cpu_ratio_trl_over_klrl": ratio_stats(col(t, "cpu_s"), col(k, "cpu_s")),
        "generate_ratio_trl_over_klrl": ratio_stats(col(t, "generate_s"), col(k, "generate_s")),
        "klrl": {"step_s_median": med(k, "total_s"), "step_cpu_s_median": med(k, "cpu_s"),
                 "warmup_s": sum(r["total_s"] for r in k[:warmup]),  # with --compile: the compilation
                 "generate_s_median": med(k, "generate_s"), "update_s_median": med(k, "update_s")},
        "trl": {"step_s_median": med(t, "total_s"), "step_cpu_s_median": med(t, "cpu_s"),
                "generate_s_median": med(t, "generate_s"),
                "rest_s_median": statistics.median(r["total_s"] - r["generate_s"] for r in t[warmup:])},
        "identical": check_identical(k, t, workload),
        "per_step_s": {"klrl": [r["total_s"] for r in k], "trl": [r["total_s"] for r in t]},
        "per_step_cpu_s": {"klrl": [r["cpu_s"] for r in k], "trl": [r["cpu_s"] for r in t]},
    }


def report(r: dict) -> None:
    s, c, idn = r["ratio_trl_over_klrl"], r["cpu_ratio_trl_over_klrl"], r["identical"]
    print(f"TRL/klrl = {s['ratio_of_medians']:.2f}  (95% bootstrap CI {s['ci95_bootstrap'][0]:.2f}-"
          f"{s['ci95_bootstrap'][1]:.2f}; per-pair median {s['per_pair_median']:.2f}, IQR "
          f"{s['per_pair_iqr'][0]:.2f}-{s['per_pair_iqr'][1]:.2f})")
    print(f"  CPU time: TRL/klrl = {c['ratio_of_medians']:.2f} (95% CI {c['ci95_bootstrap'][0]:.2f}-"
          f"{c['ci95_bootstrap'][1]:.2f}); klrl {r['klrl']['step_cpu_s_median']:.3f} s, TRL "
          f"{r['trl']['step_cpu_s_median']:.3f} s CPU per step")
    print(f"  klrl step {r['klrl']['step_s_median']:.3f} s = generate {r['klrl']['generate_s_median']:.3f} + "
          f"update {r['klrl']['update_s_median']:.3f};  TRL step {r['trl']['step_s_median']:.3f} s = generate "
          f"{r['trl']['generate_s_median']:.3f} + rest {r['trl']['rest_s_median']:.3f}")
    print(f"  identical work: {'yes' if identical_ok(idn) else 'NO'} {json.dumps(idn)}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=WORKLOADS, default="tiny")
    ap.add_argument("--pairing", choices=[*PAIRINGS, "all"], default="all")
    ap.add_argument("--steps", type=COUNT, default=60)
    ap.add_argument("--threads", type=THREADS, nargs="+", default=[1], help="one run per thread count")
    ap.add_argument("--warmup", type=NONNEG, default=None, help="steps dropped before the medians (default 5, or 2 "
                                                                "when --steps < 30, 1 when --steps < 6)")
    ap.add_argument("--out", default=str(RESULTS / "vs_trl.json"), help="the JSON file, merged into")
    ap.add_argument("--compile", action="store_true",
                    help="what if: klrl's policy and reference forwards under torch.compile(dynamic=True) (stored "
                         "as <model>/<pairing>/threads=<n>/compiled; the warm-up steps include the compilation)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra klrl config overrides (e.g. model.warmstart.steps=40 for a quick check)")
    a = ap.parse_args()
    if a.warmup is None:
        a.warmup = 5 if a.steps >= 30 else 2 if a.steps >= 6 else 1
    if a.steps < a.warmup + 1:
        ap.error(f"--steps must exceed the {a.warmup} warm-up steps")
    from klrl.errors import ConfigError

    try:  # the workers would compose the same config; a bad --set is a usage error here, before any is started
        compose_config({**WORKLOADS[a.model], "overrides": list(a.set)}, next(iter(PAIRINGS)), a.threads[0])
    except ConfigError as e:
        ap.error(f"--set: {e}")
    return a


def main() -> None:
    a = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops early and still reports, as Ctrl-C
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = Path(a.out)
    res = json.loads(path.read_text()) if path.exists() else {}
    runs = res.setdefault("runs", {})
    for threads in a.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the spawned workers
            os.environ[var] = str(threads)
        set_threads(threads)
        for pairing in list(PAIRINGS) if a.pairing == "all" else [a.pairing]:
            print(f"{a.model} / {pairing} / {threads} thread(s), {a.steps} steps (first {a.warmup} dropped)",
                  flush=True)
            r = run_pairing(a.model, pairing, a.steps, threads, a.warmup, a.set, a.compile)
            r["machine"], r["measured_at"] = machine(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            runs[f"{a.model}/{pairing}/threads={threads}" + ("/compiled" if a.compile else "")] = r
            res["machine"] = r["machine"]
            write(res, path)
            report(r)
            if r["interrupted"]:
                print(f"stopped early; written to {path}")
                return
    print(f"written to {path}")


def write(res: dict, path: Path) -> None:
    if path.resolve() == (RESULTS / "vs_trl.json").resolve():
        save(res, "vs_trl")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
