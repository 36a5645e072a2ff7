"""One generation step and one training step of a real-size architecture, through klrl's own `generate`, `shard`
and `update`: tokens/s and peak GPU memory. Random initialisation (no weights reach a GPU box without the hub):
the shapes, not the numbers, are what cost time and memory. Writes benchmarks/results/gpu-<shape>.json.

    python benchmarks/bench_gpu.py --shape qwen2.5-0.5b            # bf16 compute over float32 masters (FSDP of 1)
    python benchmarks/bench_gpu.py --shape qwen2.5-1.5b --pure-bf16
    python benchmarks/bench_gpu.py --shape smoke --device cpu     # a seconds-long check of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from klrl.cli.compose import register_configs

from klrl.config.specs import kl_spec, pg_spec
from klrl.training.distributed import setup, shard
from klrl.sampling.generation import make_generator
from klrl.models.tiny import build_char_tokenizer
from klrl.sampling.batch import Batch
from klrl.training.update import update
from report import save  # benchmarks/report.py

# Qwen2.5 shapes from their published configs; vocab 151936 (what the logits and the embedding cost).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pure-bf16", action="store_true", help="no FSDP, bf16 weights (the precision-losing setup)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=8)
    a = ap.parse_args()

    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    fsdp = not a.pure_bf16
    overrides = [f"algo.group_size={a.group}", f"algo.prompts_per_step={a.prompts}", f"algo.micro_batch_size={a.micro}",
                 "estimator=k3", "placement=loss", "beta=0.05", "model.dtype=bfloat16",
                 *(["model.fsdp=true", "model.param_dtype=float32"] if fsdp else [])]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    device = torch.device(a.device)
    dist = setup(device, fsdp)
    torch.manual_seed(0)
    mc = AutoConfig.for_model("qwen2", **SHAPES[a.shape], pad_token_id=0, eos_token_id=2, bos_token_id=1)
    model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32 if fsdp else torch.bfloat16).to(device)
    ref = AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16).to(device).requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    model.activation_checkpointing_enable()  # as the paper model configs do
    if fsdp:
        shard(model, device, torch.bfloat16)
        shard(ref, device, torch.bfloat16)
    tok = build_char_tokenizer()  # only its pad / eos ids matter: prompts are random ids, nothing is decoded
    B = a.prompts * a.group
    prompts = torch.randint(3, mc.vocab_size, (B, a.prompt_len)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    sync()
    t0 = time.perf_counter()
    ro = make_generator(cfg, model, tok).generate(prompts, a.new_tokens, temperature=1.0)  # the trainer's hf path
    sync()
    t_gen = time.perf_counter() - t0
    gen_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    n_tok = int(ro.response_mask.sum())
    rewards = (torch.rand(B) < 0.5).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    rec = update(Batch(ro, rewards, t_gen), cfg, model, ref, opt, sched, kl_spec(cfg), pg_spec(cfg), dist)
    sync()
    t_train = time.perf_counter() - t0
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": a.shape, "params": sum(p.numel() for p in model.parameters()),
        "precision": "bf16 compute, float32 masters (FSDP of 1)" if fsdp else "pure bf16",
        "sequences": B, "prompt_len": a.prompt_len, "response_tokens": n_tok, "micro_batch": a.micro,
        "generate_s": round(t_gen, 2), "generate_tokens_per_s": round(n_tok / t_gen),
        "generate_peak_gib": None if gen_peak is None else round(gen_peak, 2),
        "train_s": round(t_train, 2), "train_tokens_per_s": round(n_tok / t_train),
        "train_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "grad_norm": rec["grad_norm"],
    }
    save(res, f"gpu-{a.shape}{'-purebf16' if a.pure_bf16 else ''}")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
