#!/usr/bin/env python3
"""TRL's side of the GPU kit: Hugging Face TRL GRPOTrainer on the workload of workload.py; writes one JSON file (--out).

    python benchmarks/gpu/trl_bench.py --shape qwen2.5-0.5b --out out/trl_05b.json --workdir /tmp/trl_work

Settings matching klrl_bench.py: the same Qwen2.5-shaped config (workload.SHAPES), random init, PROMPTS x GROUP
completions per optimizer step (num_generations = GROUP, generation_batch_size = PROMPTS x GROUP), --prompt-len
random prompt tokens, --new-tokens (max_completion_length), beta 0.05 (TRL's GRPO: k3 in the loss), loss_type grpo
(klrl's algo=grpo aggregation: per-sequence token mean, then the mean over sequences), one optimizer
step per generation batch (num_iterations 1), --micro sequences per forward/backward (gradient_accumulation_steps =
PROMPTS x GROUP / micro), gradient checkpointing, use_vllm False (transformers generate, as klrl's hf backend),
AdamW lr 1e-6 constant, max_grad_norm 1.0, temperature 1, top_p 1, top_k 0.
Precision: --precision mixed: float32 weights (policy and reference) + Trainer bf16=True (bf16 autocast) on CUDA,
float32 without autocast on CPU; --precision bf16: bf16 weights.

Offline: the tokenizer is a WordLevel vocabulary of exactly vocab_size tokens (<pad>=0 <bos>=1 <eos>=2 <unk>=3, then
"t4" ... "t<V-1>"), whitespace pre-tokenizer, no post-processor, so a prompt of N words is N ids; the reward is a
random 0/1 per completion computed from the DECODED completions (TRL's decode/reward path runs). TRL builds its
reference model from a path, so model and tokenizer are saved to --workdir first (deleted at the end).

Timing: a callback stamps on_step_begin / on_step_end; a subclass times TRL's `_generate` (tokenize, generate,
decode). train_s = step_s - generate_s (reward, reference forward, the policy passes, clipping, optimizer step: the
counterpart of klrl's update). Peak memory: generate_peak_gib inside `_generate`, train_peak_gib from its end to the
step's end, as klrl_bench.py splits them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_k, _v)

from workload import (BOS, EOS, PAD, PRECISIONS, SHAPES, add_workload_args, device_name, model_config,  # noqa: E402
                      step_figures, write_result)


def log(msg: str) -> None:
    print(f"[trl_bench] {msg}", file=sys.stderr, flush=True)


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    assert fast("t7 t8 t%d" % (vocab_size - 1))["input_ids"] == [7, 8, vocab_size - 1]
    assert fast.decode([7, 8, EOS], skip_special_tokens=True) == "t7 t8"
    return fast


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--workdir", default=None, help="where the random model is saved for TRL (default: a temp dir)")
    return ap.parse_args()


class Bench:
    """One run's settings (A), its result dict (res, rewritten to --out as it fills) and the per-step timings."""

    def __init__(self, A: argparse.Namespace):
        self.A, self.t_start = A, time.perf_counter()
        self.B, self.cuda = A.prompts * A.group, A.device == "cuda"
        self.res = {"framework": "trl", "bench": "trl_bench", "status": "setup", "shape": A.shape,
                    "precision": A.precision, "device": device_name(A.device), "sequences": self.B,
                    "prompts": A.prompts, "group": A.group, "prompt_len": A.prompt_len, "new_tokens": A.new_tokens,
                    "micro_batch": A.micro, "beta": A.beta, "warmup_steps": A.warmup}
        self.rows: dict[int, dict] = {}  # optimizer step (1-based) -> figures
        self.write()

    def write(self) -> None:
        write_result(self.A.out, self.res)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t_start, 1)

    def start_torch(self) -> None:
        """Import torch and the HF stack quietly; sync and peak: no-ops on CPU."""
        import datasets
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        self.torch = torch
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if self.cuda else (lambda: None)

    def record(self, step: int) -> None:
        """The figures of every fully timed step so far into res (and --out); a log line for `step`."""
        A, rows = self.A, self.rows
        done = [s for s in sorted(rows) if {"t0", "t1", "generate_s", "tokens"} <= rows[s].keys()]
        figs = [{"generate_s": rows[s]["generate_s"], "train_s": rows[s]["t1"] - rows[s]["t0"] - rows[s]["generate_s"],
                 "tokens": rows[s]["tokens"], "generate_peak_gib": rows[s].get("generate_peak_gib"),
                 "train_peak_gib": rows[s].get("train_peak_gib")} for s in done]
        self.res.update(step_figures(figs, A.warmup), status="ok" if len(done) == A.warmup + A.steps else "partial",
                        generate_inside_step=all(rows[s]["t0"] <= rows[s]["gen_start"] <= rows[s]["t1"] for s in done),
                        total_wall_s=self.elapsed())
        self.write()
        if done and done[-1] == step:
            f = figs[-1]
            log(f"step {step}{' (warm-up)' if step <= A.warmup else ''}: generate {f['generate_s']:.3f}s "
                f"rest {f['train_s']:.3f}s tokens {f['tokens']:.0f}")


def save_random_model(bench: Bench, work: str):
    """The random Qwen2.5-shaped model and the WordLevel tokenizer, saved for TRL; (model_dir, tokenizer)."""
    A, torch = bench.A, bench.torch
    from transformers import AutoModelForCausalLM

    model_dir = os.path.join(work, f"model-{A.shape}-{A.precision}")
    tok = build_tokenizer(SHAPES[A.shape]["vocab_size"])
    dtype = torch.float32 if A.precision == "mixed" else torch.bfloat16
    torch.manual_seed(A.seed)
    with torch.device(A.device):
        model = AutoModelForCausalLM.from_config(model_config(A.shape), dtype=dtype)
    bench.res["params"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    if bench.cuda:
        torch.cuda.empty_cache()
    bench.res["model_build_save_s"] = bench.elapsed()
    return model_dir, tok


def make_data(A: argparse.Namespace, n_prompts: int):
    """(prompt texts, their dataset, the random 0/1 reward function over decoded completions)."""
    import datasets

    V = SHAPES[A.shape]["vocab_size"]
    rng = random.Random(A.seed)
    prompts = [" ".join(f"t{rng.randrange(4, V)}" for _ in range(A.prompt_len)) for _ in range(n_prompts)]
    reward_rng = random.Random(A.seed + 1)

    def random_reward(prompts, completions, **kw):  # klrl_bench: rewards = rand < 0.5
        assert all(isinstance(c, str) for c in completions)
        return [float(reward_rng.random() < 0.5) for _ in completions]

    return prompts, datasets.Dataset.from_dict({"prompt": prompts}), random_reward


def grpo_config(bench: Bench, work: str):
    """TRL's GRPOConfig for the workload; (config, the name of its checkpointing flag)."""
    from trl import GRPOConfig

    A, B, cuda = bench.A, bench.B, bench.cuda
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    cfg = GRPOConfig(
        output_dir=os.path.join(work, "out"), max_steps=A.warmup + A.steps,
        per_device_train_batch_size=A.micro, gradient_accumulation_steps=B // A.micro,
        num_generations=A.group, num_iterations=1, max_completion_length=A.new_tokens,
        loss_type="grpo",  # mean over each sequence's tokens, then over sequences: klrl's algo=grpo aggregation
        temperature=1.0, top_p=1.0, top_k=0, beta=A.beta, learning_rate=A.lr, lr_scheduler_type="constant",
        max_grad_norm=1.0, use_vllm=False, bf16=cuda and A.precision == "mixed", fp16=False, use_cpu=not cuda,
        model_init_kwargs={"dtype": "float32" if A.precision == "mixed" else "bfloat16"},
        report_to="none", logging_steps=1, eval_strategy="no", save_strategy="no", seed=A.seed,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False, **{ckpt_key: True},
    )
    assert cfg.generation_batch_size == B and cfg.steps_per_generation == B // A.micro, (
        cfg.generation_batch_size, cfg.steps_per_generation)
    return cfg, ckpt_key


def step_timer(bench: Bench):
    """A callback stamping each optimizer step's start and end, and its completion tokens from TRL's log."""
    from transformers import TrainerCallback

    rows = bench.rows

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            bench.sync()
            rows.setdefault(state.global_step + 1, {})["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            bench.sync()
            r = rows.setdefault(state.global_step, {})
            r["t1"], r["train_peak_gib"] = time.perf_counter(), bench.peak()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:  # a training step's log, not the end-of-training one
                r = rows.setdefault(state.global_step, {})
                r["tokens"] = logs["completions/mean_length"] * bench.B
                bench.record(state.global_step)

    return StepTimer()


def timed_trainer(bench: Bench):
    """GRPOTrainer timing its `_generate` (tokenize, generate, decode) and the generation's peak memory."""
    from trl import GRPOTrainer

    torch, rows = bench.torch, bench.rows

    class Timed(GRPOTrainer):
        def _generate(self, *a, **kw):
            bench.sync()
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = super()._generate(*a, **kw)
            bench.sync()
            r = rows.setdefault(self.state.global_step + 1, {})
            r["generate_s"] = r.get("generate_s", 0.0) + time.perf_counter() - t0
            r["generate_peak_gib"] = bench.peak()
            r.setdefault("gen_start", t0)
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()  # the train peak: from here to the step's end
            return out

    return Timed


def train(bench: Bench, model_dir: str, tok, work: str) -> None:
    """Build the trainer on the saved model, check what it will run, and train."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    A, res = bench.A, bench.res
    prompts, dataset, random_reward = make_data(A, bench.B * (A.warmup + A.steps + 1))
    cfg, ckpt_key = grpo_config(bench, work)
    # processing_class given explicitly: left to itself, TRL's AutoProcessor picks the class from the model type
    # (Qwen2Tokenizer for "qwen2"), which rebuilds a BPE tokenizer from this WordLevel file and encodes every prompt
    # to zero ids (seen with transformers 5.17).
    trainer = timed_trainer(bench)(model=model_dir, reward_funcs=random_reward, args=cfg, train_dataset=dataset,
                                   processing_class=tok, callbacks=[step_timer(bench)])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    assert trainer.ref_model is not None, "beta > 0 must create a reference model"
    probe = trainer.processing_class(text=prompts[:2])["input_ids"]
    assert [len(p) for p in probe] == [A.prompt_len] * 2, [len(p) for p in probe]
    m = trainer.model
    res.update(precision_detail=PRECISIONS[A.precision] + (
        " (float32 weights + Trainer bf16 autocast), float32 reference" if cfg.bf16 else
        " (float32 weights, no autocast on CPU)" if A.precision == "mixed" else ""),
        trl={"loss_type": cfg.loss_type, "beta": cfg.beta, ckpt_key: True, "use_vllm": False,
             "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "policy_dtype": str(m.dtype),
             "ref_dtype": str(trainer.ref_model.dtype)},
        setup_s=bench.elapsed())
    bench.write()
    log(f"{A.shape} {A.precision}: {res['params']:,} params, {m.dtype} on {m.device}, setup {res['setup_s']}s")
    trainer.train()


def finish(bench: Bench) -> None:
    """Versions and the final status into --out; exit non-zero unless every step was timed."""
    import accelerate
    import datasets
    import transformers
    import trl

    A, res, rows = bench.A, bench.res, bench.rows
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__,
                       "torch": bench.torch.__version__, "datasets": datasets.__version__,
                       "accelerate": accelerate.__version__}
    if res.get("status") != "ok":
        res["status"] = "failed"
        res["reason"] = f"{len([s for s in rows if 't1' in rows[s]])} of {A.warmup + A.steps} steps were timed"
    bench.write()
    if res["status"] != "ok":
        raise SystemExit(res["reason"])
    log(f"done: step {res['step_s']}s, generate {res['generate_tokens_per_s']} tok/s, "
        f"train {res['train_tokens_per_s']} tok/s")


def main() -> None:
    A = parse_args()
    bench = Bench(A)
    if bench.B % A.micro:
        raise SystemExit(f"--micro {A.micro} must divide prompts x group = {bench.B}")
    import trl  # noqa: F401  (an ImportError here, before any work, is how run.sh learns TRL is missing)

    bench.start_torch()
    work = A.workdir or tempfile.mkdtemp(prefix="trl-bench-")
    model_dir, tok = save_random_model(bench, work)
    try:
        train(bench, model_dir, tok, work)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)  # GBs of random weights
        if not A.workdir:
            shutil.rmtree(work, ignore_errors=True)
    finish(bench)


if __name__ == "__main__":
    main()
