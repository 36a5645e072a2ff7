"""`klrl eval RUN_DIR`: evaluate a run's checkpoint again, e.g. with more samples per problem.

The model is rebuilt from the run's own resolved config (.hydra/config.yaml) by the trainer's loading path, given the
checkpoint's weights, and evaluated by `klrl.evaluate.evaluate` with the seed the trainer uses at that step: with
the run's settings the numbers reproduce its last evaluation. Results are printed and written to RUN_DIR/eval.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klrl.config.schema import ConfigError

EVAL_JSON = "eval.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="klrl eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n-samples", type=int, help="samples per problem for pass@1 (default: the run's eval.n_samples)")
    p.add_argument("--split", action="append", help="evaluate only this split (repeatable; default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's device setting")
    return p.parse_args(argv)


def load_run_config(run_dir: Path):
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {path} is missing")
    return OmegaConf.load(path)


def evaluate_run(run_dir: Path, n_samples: int | None = None, splits: list[str] | None = None,
                 device: str | None = None) -> dict:
    import torch

    from klrl.config.schema import validate
    from klrl.training.distributed import local_device
    from klrl.training.evaluate import eval_sampling, evaluate
    from klrl.models.registry import DTYPES, load_model
    from klrl.runs.rundir import load_checkpoint, write_json
    from klrl.tasks import TASKS
    from klrl.training.trainer import step_seed

    cfg = load_run_config(run_dir)
    if n_samples is not None:
        if n_samples < 1:
            raise ConfigError(f"--n-samples={n_samples} must be >= 1")
        cfg.eval.n_samples = n_samples
    if device is not None:
        cfg.device = device
    validate(cfg)
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir} holds no checkpoint.pt to evaluate")

    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    available = task.eval_splits()
    chosen = splits or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(f"--split {unknown[0]!r} is not valid; choose from: {', '.join(available)}")
    model, tokenizer = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    model.load_state_dict(ckpt["model"])
    model.to(local_device(cfg.device), DTYPES[cfg.model.dtype])  # float32 masters (FSDP runs) evaluate as trained
    step = ckpt["step"]
    metrics = evaluate(model, tokenizer, task, {s: available[s] for s in chosen}, cfg,
                       seed=step_seed(cfg.seed, 10**9 + step))
    result = {"step": step, "n_samples": cfg.eval.n_samples, "eval_sampling": eval_sampling(cfg), "splits": chosen,
              "metrics": metrics}
    write_json(run_dir / EVAL_JSON, result)
    return result


def format_result(result: dict) -> str:
    m = result["metrics"]
    lines = [f"step {result['step']}, pass@1 over {result['n_samples']} samples per problem"]
    for key in sorted(k for k in m if not k.endswith(("_lo", "_hi"))):
        lines.append(f"  {key:<28} {m[key]:.4f}  [{m[key + '_lo']:.4f}, {m[key + '_hi']:.4f}]")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.n_samples, args.split, args.device)
    except ConfigError as e:
        print(f"klrl: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_result(result))
    print(f"written to {args.run_dir / EVAL_JSON}")
