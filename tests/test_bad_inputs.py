"""The bad-input battery (issue #12, "Nothing lost, nothing silently accepted").

Every case is a command line that klrl must refuse: exit 2, exactly one line on stderr (`klrl: ...`, naming what
is wrong), no traceback, no new file or directory anywhere under the test's tree (its working directory, a
pre-existing real run, broken copies of it, grid files), and every pre-existing file unchanged (sha256 before and
after). Cases run in-process (`klrl.cli.main.main`), with whatever would start real work (training, an audit, an
evaluation's model) replaced by a tripwire, so an accepted case fails at once instead of training; a handful go
through the real `python -m klrl` too.

Kinds covered: non-finite and out-of-range numbers in every knob family, wrong types, out-of-range choices, schema
entries as choices, unknown keys at every level (with suggestions) and `+key=value`, keys of a logger not chosen,
deleted or unset keys and groups, cross-field rules, `hydra.*` keys and unusable run/sweep directories, Hydra's flags
(`--cfg`, `--info`, `--config-name`, ...) and override syntax, multiruns and sweeps (grid files too),
audit/eval/table/status options, unwritable outputs, missing/corrupt run directories, and refused commands against an
existing run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, run_klrl

LONG = "n" * 300  # a path component longer than NAME_MAX
GRIDS = {
    "nan": "grid:\n  - {beta: [0.1, .nan]}\n",
    "garbage": ": : [\n",
    "unknown": "grdi:\n  - {beta: [0.1]}\n",
    "notlist": "grid: 3\n",
    "badkey": "grid:\n  - {optim.lrr: [0.1]}\n",
    "nested": "grid:\n  - {beta: [[1, 2]]}\n",
    "hydrakey": "grid:\n  - {hydra.run.dir: [x]}\n",
    "launcher": "launcher: nosuch\ngrid:\n  - {beta: [0.1]}\n",
    "list": "[1, 2]\n",
    "both": "overrides: [beta=0.1]\ngrid:\n  - {beta: [0.1, 0.2]}\n",
    "share": "grid:\n  - {steps: [1, 2]}\n",  # steps never names a run directory: two runs, one directory
    "schema": "grid:\n  - {model: [tiny, tiny_schema]}\n",
    "ok": "grid:\n  - {seed: [0, 1]}\n",
}

# (command line, a fragment the one line must contain). Placeholders: {run} a real run; {runs} its parent;
# {file} a plain file; {empty} an empty directory; {grid} the grid files; {bad} broken copies of the run.
TRAIN = [
    # non-finite numbers, every float knob family
    ("beta=nan", "beta=nan"),
    ("beta=inf", "beta=inf"),
    ("beta=-inf", "beta=-inf"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.eps=inf", "optim.eps=inf"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("optim.grad_clip=inf", "optim.grad_clip"),
    ("optim.betas=[0.9,nan]", "optim.betas"),
    ("generation.temperature=nan", "generation.temperature=nan"),
    ("generation.top_p=nan", "generation.top_p"),
    ("eval.temperature=inf", "eval.temperature"),
    ("eval.top_p=nan", "eval.top_p"),
    ("estimator=k3 placement=loss estimator.clamp_value=nan", "estimator.clamp_value=nan"),
    ("estimator=k3 placement=loss estimator.clamp_log_ratio=inf", "estimator.clamp_log_ratio"),
    ("algo.agg=seq_mean_token_sum_norm algo.agg_norm=nan", "algo.agg_norm"),
    ("algo.updates_per_batch=2 algo.ratio_clip=nan", "algo.ratio_clip"),
    ("async_level=2 algo.is_truncate=inf", "algo.is_truncate"),
    ("model.warmstart.lr=nan", "model.warmstart.lr"),
    # out of range: negative, zero, too large
    ("beta=-1", "beta=-1.0"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.eps=-1", "optim.eps"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5"),
    ("optim.betas=[2,2]", "optim.betas=[2.0, 2.0]"),
    ("optim.betas=[0.9]", "a list of 2 values"),
    ("algo.is_truncate=-1 async_level=2", "algo.is_truncate=-1.0"),
    ("algo.updates_per_batch=2 algo.ratio_clip=1.5", "algo.ratio_clip=1.5"),
    ("model.num_layers=0", "model.num_layers=0"),
    ("model.hidden_size=-64", "model.hidden_size"),
    ("model.cpu_threads=0", "model.cpu_threads"),
    ("model.warmstart.batch_size=0", "model.warmstart.batch_size"),
    ("model.warmstart.steps=-1", "model.warmstart.steps"),
    ("eval.bootstrap=0", "eval.bootstrap=0"),
    ("eval.batch_size=0", "eval.batch_size=0"),
    ("eval.n_samples=0", "eval.n_samples"),
    ("eval.every=-1", "eval.every"),
    ("eval.top_p=0", "eval.top_p"),
    ("generation.top_p=1.5", "generation.top_p"),
    ("generation.temperature=0", "generation.temperature"),
    ("task.max_new_tokens=0", "task.max_new_tokens=0"),
    ("task.eval_size=0", "task.eval_size=0"),
    ("task.digits=7", "task.digits=7"),
    ("algo.group_size=0", "algo.group_size=0"),
    ("algo.prompts_per_step=0", "algo.prompts_per_step"),
    ("algo.micro_batch_size=0", "algo.micro_batch_size"),
    ("steps=0", "steps=0"),
    ("seed=-1", "seed=-1"),
    ("seed=99999999999999999999", "seed=99999999999999999999"),
    ("ckpt_every=0", "ckpt_every=0"),
    ("extras_every=0", "extras_every=0"),
    ("async_level=-1", "async_level"),
    ("generation.backend=vllm generation.vllm.gpu_memory_utilization=1.5", "generation.vllm.gpu_memory_utilization"),
    # wrong types: refused, never coerced
    ("steps=1.5", "steps"),
    ("steps=abc", "steps=abc is not valid; it must be an integer in 1..1000000000"),
    ("seed=1.5", "seed=1.5 is not valid; it must be an integer in 0.."),
    ("eval.temperature=hot", "eval.temperature=hot is not valid; it must be a finite number > 0"),
    ("beta=true", "beta"),
    ("beta=[1,2]", "beta"),
    ("optim.betas=0.9", "optim.betas"),
    ("tensorboard=2", "tensorboard=2"),
    ("progress=yes", "progress=yes"),
    ("placement.reward_is_weight=1", "placement.reward_is_weight=1"),
    ("resume=1", "resume=1"),
    ("hydra.job.chdir=maybe", "hydra.job.chdir"),
    # choices
    ("estimator=k9", "estimator='k9' is not valid; choose from: abs, k1, k1+, k2, k3, k3+, none"),
    ("placement=warp", "placement='warp'"),
    ("algo=ppo", "algo='ppo'"),
    ("model=gpt5", "model='gpt5'"),
    ("task=nosuch", "task='nosuch'"),
    ("experiment=nosuch", "experiment='nosuch'"),
    ("model=", "model=''"),
    ("algo.baseline=ppo", "algo.baseline='ppo'"),
    ("algo.agg=foo", "algo.agg='foo'"),
    ("model.dtype=float64", "model.dtype='float64'"),
    ("model.arch=gpt2", "model.arch='gpt2'"),
    ("device=tpu", "device='tpu'"),
    ("async_mode=foo", "async_mode='foo'"),
    ("preset=trl_grpo estimator=none", "beta=0.04 with estimator=none would be ignored (preset=trl_grpo sets "
     "beta=0.04); set beta=0"),
    ("resume=maybe", "resume='maybe' is not valid; choose from: auto, true, false"),
    ("generation.backend=sglang", "generation.backend='sglang'"),
    ("placement.reward_form=sum", "placement.reward_form='sum'"),
    ("task.name=mmlu_college", "task.name='mmlu_college'"),
    ("model.name=../../etc", "model.name='../../etc'"),
    ("algo.name=''", "algo.name=''"),
    ("model=qwen2.5-7b model.attn_implementation=foo", "model.attn_implementation='foo'"),
    ("hydra/launcher=nosuch", "hydra/launcher='nosuch'"),
    # schema entries are not choices
    ("estimator=estimator_schema", "estimator='estimator_schema' is not valid"),
    ("model=tiny_schema", "model='tiny_schema' is not valid"),
    ("model=pretrained_schema", "model='pretrained_schema' is not valid"),
    ("task=arith_schema", "task='arith_schema' is not valid"),
    ("-m model=tiny,tiny_schema", "model='tiny_schema' is not valid"),
    # unknown keys, at every level, with the closest valid keys
    ("nosuchkey=1", "unknown key 'nosuchkey'"),
    ("bta=0.1", "did you mean beta"),
    ("estimater=k3", "unknown key 'estimater'; did you mean estimator?"),  # the near ones only (not resume)
    ("optim.lrr=1e-3", "did you mean optim.lr"),
    ("optimm.lr=1e-3", "did you mean optim"),
    ("model.hidden_sze=32", "did you mean model.hidden_size"),
    ("model.warmstart.stepz=3", "did you mean model.warmstart.steps"),
    ("generation.vllm.foo=1", "unknown key 'generation.vllm.foo'"),
    ("model.hf_id=x", "unknown key 'model.hf_id'"),
    ("beta.x=1", "beta"),
    ("+foo=bar", "unknown key 'foo'"),
    ("++foo=1", "unknown key 'foo'"),
    ("+optim.foo=1", "unknown key 'optim.foo'"),
    ("+model.warmstart.foo=1", "unknown key 'model.warmstart.foo'"),
    # a key of a logger that is not chosen (the default is logger=tensorboard)
    ("logger.wandb.project=x", "logger.wandb.project=x: the wandb logger is not selected; add "
                               "logger=[tensorboard,wandb] (choices: mlflow, none, tensorboard, wandb)"),
    ("logger=[tensorboard,wandb] logger.mlflow.experiment=e", "logger.mlflow.experiment=e: the mlflow logger is not "
     "selected; replace logger=[tensorboard,wandb] with logger=[tensorboard,wandb,mlflow]"),
    # keys and groups removed or unset
    ("~beta", "~beta"),
    ("~optim", "~optim"),
    ("~model", "leaves no model"),
    ("estimator=null", "leaves no estimator"),
    # cross-field rules
    ("estimator=none beta=0.1", "beta=0.1 with estimator=none"),
    ("estimator=none placement=loss beta=0", "placement=loss with estimator=none"),
    ("estimator=none beta=0 estimator.clamp_value=1", "estimator.clamp_value=1.0 has no effect with estimator=none"),
    ("placement=none", "placement=none"),
    ("beta=0", "beta=0 makes estimator=k1 inert"),
    ("placement=loss placement.reward_form=togo", "placement.reward_form='togo' has no effect"),
    ("placement=reward placement.loss_is_weight=true", "placement.loss_is_weight=True has no effect"),
    ("placement=both placement.reward_is_weight=true placement.reward_form=togo", "placement.reward_is_weight"),
    ("algo.group_size=1", "algo.group_size=1 is too small"),
    ("algo.updates_per_batch=4", "algo.updates_per_batch=4 needs algo.ratio_clip"),
    ("async_level=2", "async_level=2 makes rollouts off-policy"),
    ("algo.is_truncate=8", "algo.is_truncate=8.0 has no effect on-policy"),
    ("async_level=2 algo.is_truncate=8 algo.ratio_clip=0.2", "alternatives"),
    ("algo.micro_batch_size=3", "algo.micro_batch_size=3 must be a multiple"),
    ("algo.agg_norm=4", "algo.agg_norm=4.0 has no effect"),
    # the framework presets' knobs, each refused where it would be ignored
    ("placement=loss estimator.clamp_after_weight=true", "estimator.clamp_after_weight=True has no effect without"),
    ("placement=loss estimator.clamp_value=3 estimator.clamp_after_weight=true", "with an unweighted in-loss term"),
    ("placement=reward placement.loss_weight=score", "placement.loss_weight='score' has no effect"),
    ("placement=loss placement.loss_weight=rho", "placement.loss_weight='rho' is not valid"),
    ("placement=loss placement.loss_weight=score placement.loss_is_weight=true", "are alternatives"),
    ("placement=loss placement.reward_logp=old", "placement.reward_logp='old' has no effect"),
    ("placement=reward placement.loss_agg=token_mean", "placement.loss_agg='token_mean' has no effect"),
    ("algo.adv_std=population", "algo.adv_std='population' has no effect with algo.baseline=rloo"),
    ("algo.baseline=grpo algo.adv_std=pop", "algo.adv_std='pop' is not valid"),
    ("algo.adv_eps=-1", "algo.adv_eps=-1"),
    ("algo.adv_eps=0.01", "algo.adv_eps=0.01 has no effect with algo.baseline=rloo"),
    ("algo.ratio_log_clamp=20", "algo.ratio_log_clamp=20.0 has no effect on-policy"),
    ("algo.updates_per_batch=2 algo.is_truncate=2 algo.dual_clip=3", "algo.dual_clip=3.0 has no effect without"),
    ("algo.updates_per_batch=2 algo.ratio_clip=0.2 algo.dual_clip=1", "algo.dual_clip=1"),
    ("model.hidden_size=65", "model.hidden_size=65 must be divisible"),
    # a wrong type under a model source's or task's own schema: the field's range, not OmegaConf's wording
    ("model.cpu_threads=abc", "model.cpu_threads=abc is not valid; it must be an integer in 1..4096"),
    ("model.warmstart.steps=x", "model.warmstart.steps=x is not valid; it must be an integer in 0.."),
    ("task.ood_digits=2", "task.ood_digits=2 equals task.digits"),
    ("task=countdown", "model=tiny cannot read task=countdown's prompts"),
    ("task.prompt=boxed", "task.prompt=boxed needs a pretrained model's tokenizer"),
    ("task.prompt=fancy", "task.prompt='fancy' is not valid; choose from: plain, boxed"),
    ("estimator=[k1,k3]", "estimator takes one option, not a list"),
    ("experiment=smollm2_arith task=countdown", "experiment=smollm2_arith sets 'task.prompt', which the other "
     "choices do not have (unknown key 'task.prompt'; valid keys at task: eval_seed"),
    ("task=countdown task.prompt=boxed", "unknown key 'task.prompt'; valid keys at task: eval_seed"),
    ("model.param_dtype=bfloat16", "model.param_dtype=bfloat16"),
    ("async_mode=pipeline", "async_mode=pipeline needs async_level"),
    ("generation.vllm.enforce_eager=true", "generation.vllm.enforce_eager=True has no effect"),
    ("generation.backend=vllm", "generation.backend=vllm"),
    ("model=qwen2.5-7b model.hf_id=/nonexistent/dir", "model.hf_id='/nonexistent/dir' is not a directory"),
    ("model=qwen2.5-7b model.eos_token=[]", "model.eos_token=[]"),
    ("task=math", "task.train_data.path"),  # offline, no cache: the data a run needs is missing
    ("experiment=comedy_async_math", "EleutherAI/hendrycks_math"),
    # paths that must be writable
    ("cache_dir=''", "cache_dir=''"),
    ("cache_dir=/proc/klrl-nope", "cache_dir='/proc/klrl-nope'"),
    ("cache_dir={file}", "cache_dir="),
    ("cache_dir={file}/sub", "cache_dir="),
    ("'cache_dir=${{oc.env:KLRL_NO_SUCH_VARIABLE}}'", "cache_dir"),
    # hydra.* keys and run directories
    ("hydra.foo=1", "unknown key 'hydra.foo'"),
    ("hydra.run.dirr=x", "did you mean hydra.run.dir"),
    ("hydra.launcher.foo=1", "unknown key 'hydra.launcher.foo'"),
    ("+hydra.foo=1", "unknown key 'hydra.foo'"),
    ("+hydra.job.foo=1", "unknown key 'hydra.job.foo'"),
    ("hydra.run.dir=''", "hydra.run.dir=''"),
    ("hydra.run.dir=/proc/x", "hydra.run.dir='/proc/x'"),
    ("hydra.run.dir={file}", "hydra.run.dir="),
    ("hydra.run.dir={file}/x", "hydra.run.dir="),
    (f"hydra.run.dir={{cwd}}/{LONG}", "longer than 255 bytes"),
    (f"hydra.run.dir={{cwd}}/keep/empty/{LONG}/run", "longer than 255 bytes"),
    ("-m beta=0.1,0.2 hydra.sweep.dir=''", "hydra.sweep.dir=''"),
    ("-m beta=0.1,0.2 hydra.sweep.dir=/proc/x", "hydra.sweep.dir='/proc/x'"),
    ("-m beta=0.1,0.2 hydra.sweep.dir={file}/x", "hydra.sweep.dir="),
    ("-m beta=0.1,0.1", "would share the run directory"),
    ("-m beta=0.1,0.2 hydra.sweep.subdir=same", "would share the run directory 'same'"),
    # Hydra's flags and override syntax
    ("--cfg job estimator=k9", "estimator='k9'"),
    ("--cfg hydra hydra.foo=1", "unknown key 'hydra.foo'"),
    ("--info defaults estimator=k9", "estimator='k9'"),
    ("--cfg jobb", "--cfg"),
    ("--steps 10", "unrecognized arguments: --steps; overrides are written key=value: steps=10"),
    ("--beta=0.1", "overrides are written key=value: beta=0.1"),
    ("--info nosuch", "--info"),
    ("--cfg job --package nosuch", "--package 'nosuch'"),
    ("--help estimator=k9", "estimator='k9'"),
    ("--nosuchflag", "--nosuchflag"),
    ("--config-name nosuch", "--config-name"),
    ("-cp /nonexistent", "--config-path"),
    ("--config-dir /nonexistent", "--config-dir"),
    ("-r -m beta=0.1", "choose one of"),
    ("--cfg job -m", "choose one of"),
    ("beta", "'beta' is not a valid override"),
    ("'estimator=[k1'", "not a valid override"),
    ("beta=0.1=2", "not a valid override"),
    ("beta=0.1,0.2", "sweeps several values"),
    ("'model=glob(*)'", "sweeps several values"),
    ("'beta=${{nosuch}}'", "beta"),
    ("beta=0.1 -m hydra.sweep.dir=/proc/x estimator=k1,k3", "hydra.sweep.dir='/proc/x'"),
    # every point of a multirun
    ("-m beta=0.1,nan", "beta=nan"),
    ("-m estimator=k1,k9", "estimator='k9'"),
    ("-m optim.lr=1e-4,-1", "optim.lr=-1"),
    ("-m seed=0,1 algo.group_size=1", "algo.group_size=1"),
    # refused against an existing run: nothing of it changes
    ("{fast} resume=true beta=0.2 hydra.run.dir={run}", "(beta: 0.1 -> 0.2)"),
    ("{fast} resume=false hydra.run.dir={run}", "already holds a run"),
    ("{fast} seed=3 hydra.run.dir={run}", "(seed: 0 -> 3)"),
    ("{fast} steps=3 beta=0.3 hydra.run.dir={run}", "(beta: 0.1 -> 0.3)"),
    ("resume=true hydra.run.dir={bad}/ckpt_trunc", "no readable checkpoint"),
    ("hydra.run.dir={bad}/summary_garbage", "unreadable summary.json"),
    ("hydra.run.dir={bad}/cfg_garbage", "unreadable .hydra/config.yaml"),
    # a refused command removes only the directories it created
    ("resume=true hydra.run.dir={cwd}/keep/empty/a/b", "holds no checkpoint to continue"),
    ("task=math hydra.run.dir={cwd}/keep/empty/run", "task.train_data.path"),
]
OTHERS = [
    ("nosuchcommand", "unknown command 'nosuchcommand'"),
    # klrl sweep
    ("sweep", "give a grid"),
    ("sweep nosuch", "sweep 'nosuch' is not valid"),
    ("sweep {grid}/missing.yaml", "does not exist"),
    ("sweep {grid}/nan.yaml", "beta=nan"),
    ("sweep {grid}/garbage.yaml", "cannot be read"),
    ("sweep {grid}/unknown.yaml", "unknown key(s) grdi"),
    ("sweep {grid}/notlist.yaml", "`grid` must be a list"),
    ("sweep {grid}/badkey.yaml", "did you mean optim.lr"),
    ("sweep {grid}/nested.yaml", "nested list"),
    ("sweep {grid}/hydrakey.yaml", "hydra.* settings belong in `overrides`"),
    ("sweep {grid}/launcher.yaml", "hydra/launcher='nosuch'"),
    ("sweep {grid}/list.yaml", "a grid file is a mapping"),
    ("sweep {grid}/both.yaml", "'beta' is both in `overrides` and in the grid"),
    ("sweep {grid}/share.yaml", "would share the run directory"),
    ("sweep {grid}/schema.yaml", "model='tiny_schema' is not valid"),
    ("sweep {grid}/ok.yaml --nosuch", "unknown option '--nosuch'"),
    ("sweep {grid}/ok.yaml beta=nan", "beta=nan"),
    ("sweep {grid}/ok.yaml +foo=1", "unknown key 'foo'"),
    ("sweep {grid}/ok.yaml beta", "beta"),
    ("sweep {grid}/ok.yaml hydra.sweep.dir=''", "hydra.sweep.dir=''"),
    ("sweep {grid}/ok.yaml hydra.sweep.dir=/proc/x", "hydra.sweep.dir='/proc/x'"),
    ("sweep {grid}/ok.yaml hydra/launcher=nosuch", "hydra/launcher='nosuch'"),
    ("sweep {grid}/ok.yaml hydra.launcher.foo=1", "unknown key 'hydra.launcher.foo'"),
    ("sweep {grid}/ok.yaml +hydra.sweeper.foo=1", "unknown key 'hydra.sweeper.foo'"),
    ("sweep tiny estimator=k9", "estimator='k9'"),
    # klrl audit
    ("audit beta=nan", "beta=nan"),
    ("audit generation.temperature=0", "generation.temperature=0.0"),
    ("audit estimator=k9", "estimator='k9'"),
    ("audit estimator=estimator_schema", "estimator='estimator_schema'"),
    ("audit algo=nosuch", "algo='nosuch'"),
    ("audit +foo=1", "'+foo=1' has no effect on the exact audit"),
    ("audit model=tiny", "has no effect on the exact audit"),
    ("audit estimator=none beta=0 placement=none", "estimator=none has no KL gradient"),
    ("audit --vocab 0", "--vocab"),
    ("audit --vocab two", "--vocab"),
    ("audit --length 0", "--length"),
    ("audit --group-size 1", "--group-size"),
    ("audit --vocab 10 --length 10", "the limit is"),
    ("audit --vocab 64 --length 64 --group-size 64", "the limit is"),
    ("audit --config ''", "--config"),
    ("audit --distance nan", "--distance"),
    ("audit --distance inf", "--distance"),
    ("audit --off-distance -1", "--off-distance"),
    ("audit --seed -1", "--seed"),
    ("audit --sweep-lengths abc", "--sweep-lengths"),
    ("audit --sweep-lengths 1-1000000000", "--sweep-lengths"),
    ("audit --sweep-seeds 0", "--sweep-seeds"),
    ("audit --policy foo", "--policy"),
    ("audit --config nosuch", "unknown configuration 'nosuch'"),
    ("audit --nosuch", "--nosuch"),
    ("audit --json /proc/x.json", "--json /proc/x.json"),
    ("audit --json {file}/x.json", "--json"),
    ("audit --json {cwd}", "--json"),
    ("audit --plot /proc/x.png", "--plot /proc/x.png"),
    ("audit --mc --batches 0", "--batches"),
    ("audit --mc --noise nan", "--noise"),
    ("audit --mc --noise -1", "--noise"),
    ("audit --mc model=tiny_schema", "model='tiny_schema'"),
    ("audit --mc model.num_layers=0", "model.num_layers=0"),
    ("audit --mc --json /proc/x.json", "--json /proc/x.json"),
    # klrl eval
    ("eval", "run_dir"),
    ("eval {cwd}/nonexistent", "is not a run directory"),
    ("eval {file}", "is not a run directory"),
    ("eval {empty}", "is not a run directory"),
    ("eval {run} {run}", "unrecognized arguments"),
    ("eval {run} --nosuch", "--nosuch"),
    ("eval {bad}/cfg_garbage", "unreadable .hydra/config.yaml"),
    ("eval {bad}/cfg_list", "not a mapping"),
    ("eval {bad}/cfg_nosource", "does not fit this klrl"),
    ("eval {bad}/cfg_unknownkey", "does not fit this klrl"),
    ("eval {bad}/cfg_badvalue", "beta=nan"),
    ("eval {bad}/ckpt_trunc", "no readable checkpoint"),
    ("eval {bad}/no_ckpt", "holds no checkpoint.pt"),
    ("eval {bad}/evals_is_dir", "evals.jsonl cannot be written"),
    ("eval {run} --n-samples 0", "eval.n_samples=0"),
    ("eval {run} --n-samples abc", "--n-samples"),
    ("eval {run} --temperature nan", "eval.temperature=nan"),
    ("eval {run} --temperature inf", "eval.temperature=inf"),
    ("eval {run} --top-p 0", "eval.top_p=0.0"),
    ("eval {run} --top-p nan", "eval.top_p=nan"),
    ("eval {run} --split nosuch", "--split 'nosuch' is not valid; choose from: id, ood"),
    ("eval {run} --device tpu", "--device"),
    # klrl table
    ("table", "SWEEP_DIR"),
    ("table {cwd}/nonexistent", "is not a directory"),
    ("table {file}", "is not a directory"),
    ("table {runs} --nosuch", "--nosuch"),
    ("table {runs} --csv /proc/x/t.csv", "--csv /proc/x/t.csv"),
    ("table {runs} --csv {file}/t.csv", "--csv"),
    ("table {runs} --csv {cwd}", "--csv"),
    ("table {runs} --csv ''", "--csv"),
    ("table {runs} --plots ''", "--plots"),
    ("table {runs} --latex /proc/x.tex", "--latex /proc/x.tex"),
    ("table {runs} --plots /proc/x", "--plots /proc/x"),
    ("table {runs} --plots {file}", "--plots"),
    ("table {runs} --window 0", "--window"),
    ("table {runs} --window abc", "--window"),
    ("table {runs} --reward-frac 1.5", "--reward-frac"),
    ("table {runs} --reward-frac nan", "--reward-frac"),
    ("table {runs} --eval-drop -1", "--eval-drop"),
    ("table {runs} --eval-drop nan", "--eval-drop"),
    ("table {runs} --entropy-frac inf", "--entropy-frac"),
    ("table {runs} --ema 0", "--ema"),
    # klrl status
    ("status", "give one sweep directory"),
    ("status {runs} {runs}", "give one sweep directory"),
    ("status {runs} --nosuch", "unknown option '--nosuch'"),
    ("status {cwd}/nonexistent", "nonexistent does not exist"),
    ("status nosuchsweep", "nosuchsweep does not exist (nor is outputs/sweeps/nosuchsweep a sweep)"),
    ("status {file}", "is not a directory"),
    ("status ''", "is not a sweep directory"),
]
CASES = [("train " + args, frag) for args, frag in TRAIN] + OTHERS
# Through the real command as well: the issue's own examples, one per command.
SUBPROCESS = [
    ("train beta=nan", "beta=nan"),
    ("train --cfg job estimator=k9", "estimator='k9'"),
    ("train hydra.foo=1", "unknown key 'hydra.foo'"),
    ("train logger.wandb.project=x", "the wandb logger is not selected; add logger=[tensorboard,wandb]"),
    ("train {fast} resume=true beta=0.2 hydra.run.dir={run}", "(beta: 0.1 -> 0.2)"),
    ("train task=math hydra.run.dir={cwd}/keep/empty/run", "task.train_data.path"),
    ("sweep {grid}/nan.yaml", "beta=nan"),
    ("audit --json /proc/x/a.json", "--json"),
    ("eval {bad}/ckpt_trunc", "no readable checkpoint"),
    ("table {runs} --csv /proc/x.csv", "--csv"),
    ("status {file}", "is not a directory"),
]
TIMES: dict[str, float] = {}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: 'dir', or the file's sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def break_copies(run: Path, bad: Path) -> None:
    """Copies of a real run, each broken in one way."""
    small = ["ckpt_trunc", "no_ckpt", "evals_is_dir"]
    for name in ["cfg_garbage", "cfg_list", "cfg_nosource", "cfg_badvalue", "cfg_unknownkey", "summary_garbage",
                 *small]:
        shutil.copytree(run, bad / name, ignore=None if name in small else shutil.ignore_patterns("checkpoint.pt"))
    cfg = (run / ".hydra" / "config.yaml").read_text()
    (bad / "cfg_garbage" / ".hydra" / "config.yaml").write_text(": : [\n")
    (bad / "cfg_list" / ".hydra" / "config.yaml").write_text("[1, 2]\n")
    (bad / "cfg_nosource" / ".hydra" / "config.yaml").write_text(cfg.replace("source: tiny", "source: nosuch"))
    (bad / "cfg_badvalue" / ".hydra" / "config.yaml").write_text(cfg.replace("\nbeta: 0.1", "\nbeta: .nan"))
    (bad / "cfg_unknownkey" / ".hydra" / "config.yaml").write_text(cfg + "foo: 1\n")
    (bad / "summary_garbage" / "summary.json").write_text("{")
    ckpt = (run / "checkpoint.pt").read_bytes()
    (bad / "ckpt_trunc" / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (bad / "no_ckpt" / "checkpoint.pt").unlink()
    (bad / "evals_is_dir" / "evals.jsonl").mkdir()
    assert "beta: .nan" in (bad / "cfg_badvalue" / ".hydra" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tree the battery must leave exactly as it found it: a working directory (with keep/empty), a real run
    trained once, broken copies of it, a plain file, an empty directory, grid files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"root": root, "cwd": root / "cwd", "runs": root / "runs", "bad": root / "bad", "grid": root / "grids",
             "file": root / "a_file", "empty": root / "empty", "hf": root / "hf"}
    for key in ("cwd", "runs", "bad", "grid", "empty", "hf"):
        paths[key].mkdir()
    (paths["cwd"] / "keep" / "empty").mkdir(parents=True)
    paths["file"].write_text("not a directory\n")
    for name, text in GRIDS.items():
        (paths["grid"] / f"{name}.yaml").write_text(text)
    paths["run"] = paths["runs"] / "run"
    run_klrl("train", *FAST, "steps=1", f"hydra.run.dir={paths['run']}", cwd=paths["cwd"], check=True)
    break_copies(paths["run"], paths["bad"])
    return paths


class Tripwire(AssertionError):
    pass


def tripwire(*_, **__):
    raise Tripwire("bad input accepted: real work would start")


@pytest.fixture
def offline(world, monkeypatch):
    """No hub, an empty hub cache: data and checkpoints a run would need are missing, as on a cluster's node."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(world["hf"]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.chdir(world["cwd"])


def command(case: str, world: dict[str, Path]) -> list[str]:
    return shlex.split(case.format(fast=" ".join(FAST), **{k: str(v) for k, v in world.items()}))


@pytest.mark.parametrize("case,fragment", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, fragment, world, offline, monkeypatch, capsys):
    import klrl.cli.audit
    import klrl.cli.train
    import klrl.models.registry
    import klrl.training.trainer
    from klrl.cli.main import main

    monkeypatch.setattr(klrl.training.trainer, "lock_run", tripwire)  # after the read-only checks, before writes
    monkeypatch.setattr(klrl.cli.audit, "run_exact", tripwire)
    monkeypatch.setattr("klrl.cli.audit_mc.run_mc", tripwire)
    monkeypatch.setattr(klrl.models.registry, "load_model", tripwire)
    if case.startswith("sweep"):
        monkeypatch.setattr(klrl.cli.train, "train_main", tripwire)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    handlers = list(logging.root.handlers)
    before = snapshot(world["root"])
    t0 = time.perf_counter()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(command(case, world))
    finally:
        logging.root.handlers[:] = handlers  # Hydra's job logging, set up in-process, goes with the case
        TIMES[case] = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("klrl: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("case,fragment", SUBPROCESS, ids=[c for c, _ in SUBPROCESS])
def test_bad_input_through_the_real_command(case, fragment, world, offline):
    before = snapshot(world["root"])
    proc = run_klrl(*command(case, world), cwd=world["cwd"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("klrl: ") and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0], lines[0]
    assert snapshot(world["root"]) == before


def test_the_battery_is_large_and_fast():
    """At least 90 distinct bad inputs, each refused before anything is built (seconds, not a model's minutes)."""
    assert len(set(CASES)) == len(CASES) >= 90
    slow = {case: round(t, 1) for case, t in TIMES.items() if t > 10}
    assert not slow, slow


def test_help_lists_no_schema_and_the_real_run_is_intact(world, offline, capsys):
    """Schema entries are not choices anywhere a user sees them; the battery's run is still a run."""
    proc = run_klrl("train", "--help", cwd=world["cwd"], check=True)
    assert "_schema" not in proc.stdout and "tiny" in proc.stdout and "arith" in proc.stdout
    assert (world["run"] / "checkpoint.pt").exists() and (world["run"] / ".hydra" / "config.yaml").exists()
    assert os.listdir(world["cwd"]) == ["keep"] and os.listdir(world["cwd"] / "keep" / "empty") == []
