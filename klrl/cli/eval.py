"""`klrl eval RUN_DIR`: evaluate a run's checkpoint again, e.g. with more samples per problem.

The model is rebuilt from the run's own config (.hydra/config.yaml, typed by today's schemas) by the trainer's
loading path, given the checkpoint's weights, and evaluated by the trainer's `evaluate` with the seed the trainer
uses at that step: with the run's settings the numbers reproduce its last evaluation. Each call's result is
printed and appended to RUN_DIR/evals.jsonl, so earlier results are never lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from klrl.errors import ConfigError

EVALS = "evals.jsonl"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own error is two lines (usage + message); klrl's is one
        raise ConfigError(f"eval: {message}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="klrl eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n-samples", type=int, help="samples per problem for pass@1 (default: the run's eval.n_samples)")
    p.add_argument("--temperature", type=float, help="pass@1 sampling temperature (default: the run's eval.temperature)")
    p.add_argument("--top-p", type=float, help="pass@1 nucleus (default: the run's eval.top_p)")
    p.add_argument("--split", action="append", help="evaluate only this split (repeatable; default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's device setting")
    return p.parse_args(argv)


def load_run_config(run_dir: Path):
    """The run's stored config, typed by the schemas of its model source and task (so that it validates)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from klrl.config.schema import TrainConfig
    from klrl.models.registry import SOURCES
    from klrl.runs.rundir import CONFIG, RunDir
    from klrl.tasks import TASKS

    run = RunDir(run_dir)
    try:
        stored = run.read_config()
    except ValueError as e:
        raise ConfigError(f"{run_dir}: {e}") from None
    if stored is None:
        raise ConfigError(f"{run_dir} is not a run directory: {run.file(CONFIG)} is missing")
    for key in ("logger", "tensorboard"):  # eval writes evals.jsonl only: the run's loggers need no package here
        stored.pop(key, None)
    try:
        schema = OmegaConf.structured(TrainConfig)
        schema.model = OmegaConf.structured(SOURCES[stored["model"]["source"]].schema)
        schema.task = OmegaConf.structured(TASKS[stored["task"]["name"]].schema)
        return OmegaConf.merge(schema, stored)
    except (KeyError, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(f"{run_dir}: its config does not fit this klrl ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else e!r}); evaluate it with the klrl that trained it")


def settle(cfg, args: argparse.Namespace) -> None:
    """The command line's settings over the run's, validated like any config."""
    from klrl.config.constraints import unwritable
    from klrl.config.validate import validate

    for key, value in (("eval.n_samples", args.n_samples), ("eval.temperature", args.temperature),
                       ("eval.top_p", args.top_p), ("device", args.device)):
        if value is not None:
            node, _, leaf = key.rpartition(".")
            (cfg[node] if node else cfg)[leaf] = value
    validate(cfg)
    out = args.run_dir / EVALS
    why = unwritable(out, "file")
    if why:
        raise ConfigError(f"{out} cannot be written ({why}); evaluate a run directory you can write to")


def evaluate_run(args: argparse.Namespace) -> dict:
    import torch

    from klrl.models.registry import DTYPES, load_model
    from klrl.runs import checkpoint
    from klrl.runs.rundir import RunDir
    from klrl.sampling.batch import step_seed
    from klrl.tasks import TASKS
    from klrl.training.distributed import local_device
    from klrl.training.evaluate import eval_sampling, evaluate

    cfg = load_run_config(args.run_dir)
    settle(cfg, args)
    run = RunDir(args.run_dir)
    loaded = checkpoint.load(run)
    if loaded.state is None and not loaded.skipped:
        raise ConfigError(f"{args.run_dir} holds no checkpoint.pt to evaluate")
    if loaded.state is None:
        raise ConfigError(f"{args.run_dir} holds no readable checkpoint ({'; '.join(loaded.skipped)})")
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task.name](cfg.task, cfg.seed)
    available = task.eval_splits()
    chosen = args.split or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(f"--split {unknown[0]!r} is not valid; choose from: {', '.join(available)}")
    model, tokenizer = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
    model.load_state_dict(loaded.state["model"])
    model.to(local_device(cfg.device), DTYPES[cfg.model.dtype])  # float32 masters (FSDP runs) evaluate as trained
    step = loaded.state["step"]
    metrics = evaluate(model, tokenizer, task, {s: available[s] for s in chosen}, cfg,
                       seed=step_seed(cfg.seed, 10**9 + step))
    result = {"step": step, "checkpoint": loaded.path.name, "n_samples": cfg.eval.n_samples,
              "eval_sampling": eval_sampling(cfg), "splits": chosen, "metrics": metrics}
    with open(run.file(EVALS), "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def format_result(result: dict) -> str:
    m, s = result["metrics"], result["eval_sampling"]
    lines = [f"step {result['step']}, pass@1 over {result['n_samples']} samples per problem at temperature "
             f"{s['temperature']:g}, top_p {s['top_p']:g}"]
    for key in sorted(k for k in m if not k.endswith(("_lo", "_hi"))):
        lines.append(f"  {key:<28} {m[key]:.4f}  [{m[key + '_lo']:.4f}, {m[key + '_hi']:.4f}]")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    try:
        args = parse_args(argv)
        result = evaluate_run(args)
    except ConfigError as e:
        print(f"klrl: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_result(result))
    print(f"appended to {args.run_dir / EVALS}")
