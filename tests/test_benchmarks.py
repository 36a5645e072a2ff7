"""benchmarks/vs_trl.py end to end on the tiny workload, a few steps: klrl and TRL (the bench extra) in turns on
identical work, the ratio and its spread written to JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAVE_TRL = importlib.util.find_spec("trl") is not None
STEPS = 3


@pytest.mark.skipif(not HAVE_TRL, reason="trl is not installed (pip install -c constraints.txt -e '.[bench]')")
def test_vs_trl_tiny_runs_identical_work(tmp_path):
    out = tmp_path / "vs_trl.json"
    p = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--model", "tiny", "--pairing", "all",
                        "--steps", str(STEPS), "--threads", "1", "--out", str(out), "--set", "model.warmstart.steps=40"],
                       cwd=BENCH, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"tiny/grpo_k3_loss/threads=1", "tiny/rloo_k1_reward/threads=1"}
    for name, r in res["runs"].items():
        for key in ("ratio_trl_over_klrl", "cpu_ratio_trl_over_klrl"):
            s = r[key]
            lo, hi = s["ci95_bootstrap"]
            assert s["ratio_of_medians"] > 0 and 0 < lo <= hi, (name, key, s)
        assert len(r["per_step_s"]["klrl"]) == len(r["per_step_s"]["trl"]) == STEPS
        idn = r["identical"]
        assert idn["sequences_per_step"] == [64, 64] and idn["generated_tokens_per_step"] == [512, 512], idn
        flags = {k: v for k, v in idn.items() if k.startswith(("same_", "kl_nonzero", "trl_logged"))}
        assert flags and all(flags.values()), (name, idn)
        assert idn["threads"] == [1, 1]
        assert r["workload"]["klrl_overrides"] == ["model.warmstart.steps=40"]
    assert p.stdout.count("identical work: yes") == 2, p.stdout[-3000:]


@pytest.mark.skipif(not HAVE_TRL, reason="trl is not installed (pip install -c constraints.txt -e '.[bench]')")
def test_floor_tiny_is_under_both_trainers(tmp_path):
    """benchmarks/floor.py: the bare torch step (sample with the KV cache, policy forward + backward, reference
    forward, AdamW) timed in turns with klrl's and TRL's steps; it does a subset of either trainer's work."""
    out, steps = tmp_path / "floor.json", 4
    p = subprocess.run([sys.executable, str(BENCH / "floor.py"), "--model", "tiny", "--pairing", "grpo_k3_loss",
                        "--steps", str(steps), "--threads", "1", "--out", str(out), "--set",
                        "model.warmstart.steps=40"], cwd=BENCH, capture_output=True, text=True, timeout=900,
                       env={**os.environ})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"tiny/grpo_k3_loss/threads=1"}
    r = res["runs"]["tiny/grpo_k3_loss/threads=1"]
    assert r["same_generated_tokens"] and set(r["per_step_s"]) == {"floor", "klrl", "trl"}
    assert all(len(v) == steps for v in r["per_step_s"].values())
    for key in ("trl_over_floor", "klrl_over_floor", "trl_over_klrl"):
        lo, hi = r[key]["ci95_bootstrap"]
        assert r[key]["ratio_of_medians"] > 0 and 0 < lo <= hi, (key, r[key])
    # The floor is a subset of TRL's step (one model pass per row, as TRL runs it): its fastest step is no slower
    # than TRL's fastest (the minimum over steps, as noise only adds; 10% for timer noise on a shared machine).
    # klrl may go under it: a group's rows share their prompt's forward (klrl.sampling.prefix).
    assert r["floor"]["step_ms_min"] <= 1.1 * r["trl"]["step_ms_min"], (r["floor"], r["trl"])


def test_step_breakdown_accounts_for_the_step(tmp_path):
    """benchmarks/step_breakdown.py: the timed sections of klrl's real step fit inside it, and the forward's cost
    grows with the tokens it runs (one token against the batch's shape)."""
    out = tmp_path / "breakdown.json"
    p = subprocess.run([sys.executable, str(BENCH / "step_breakdown.py"), "--model", "tiny", "--steps", str(STEPS),
                        "--out", str(out), "--set", "model.warmstart.steps=40"],
                       cwd=BENCH, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    r = json.loads(out.read_text())["tiny/grpo_k3_loss/threads=1"]
    s = r["sections"]
    parts = s["sections_ms"]
    assert {"update: backward", "update: policy and reference forwards",
            "generate: model calls and sampling (decode)"} <= set(parts), parts
    assert all(v > 0 for v in parts.values()), parts
    gen = sum(v for k, v in parts.items() if k.startswith("generate:"))
    upd = sum(v for k, v in parts.items() if k.startswith("update:"))
    assert gen <= s["generate_ms"] * 1.01 and upd <= s["update_ms"] * 1.01, s
    assert s["generate_ms"] + s["update_ms"] <= s["step_ms"] * 1.01, s
    f = r["model_forward"]
    assert f["rows"] == 64 and f["tokens"] > 8 and r["klrl_overrides"] == ["model.warmstart.steps=40"]
    assert p.stdout.strip().splitlines()[-1].startswith(f"step {s['step_ms']:.1f} ms = generate")
    for name in ("forward", "forward_backward"):
        assert 0 < f[name]["one_token_ms"] < f[name]["batch_ms"] and f[name]["batch_gflops"] > 0, f


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "argument --steps: 0 is not valid; it must be an integer"),
    (["--threads", "0"], "argument --threads: 0 is not valid; it must be an integer in 1..4096"),
    (["--set", "estimater=k3"], "--set: unknown key 'estimater'; did you mean estimator"),
])
def test_step_breakdown_refuses_bad_flags_in_one_line(args, message, tmp_path):
    out = tmp_path / "breakdown.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where its scratch run directory would be left
    p = subprocess.run([sys.executable, str(BENCH / "step_breakdown.py"), "--out", str(out), *args], cwd=BENCH,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not out.exists() and not list(tmp_path.glob("step_breakdown-*"))
