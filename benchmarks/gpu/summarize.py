#!/usr/bin/env python3
"""The summary of a run.sh output folder: $OUT/summary.md (markdown tables) and $OUT/summary.json, printed too.

    python benchmarks/gpu/summarize.py OUT [key=value ...]     # key=value pairs go to summary.json's "meta"

Reads $OUT/steps.tsv (step, framework, shape, precision, exit code, wall seconds; one line per step run.sh ran or
skipped) and each step's $OUT/<step>.json. A row's status: ok; partial (the step was stopped or failed after at
least one measured step: its figures are medians over those); timeout / failed (no usable figures); skipped.
Ratios are TRL / klrl for each shape and precision both sides ran: > 1 means TRL takes longer (or more memory).
Exit status 1 when a step failed or timed out with nothing measured, else 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = ("measured_steps", "completion_tokens", "step_s", "generate_s", "train_s", "generate_tokens_per_s",
           "train_tokens_per_s", "step_tokens_per_s", "generate_peak_gib", "train_peak_gib")
RATIOS = (("step_s", "step time"), ("generate_s", "generate time"), ("train_s", "update time"),
          ("generate_peak_gib", "generate peak mem"), ("train_peak_gib", "update peak mem"),
          ("completion_tokens", "tokens (same work: ~1)"))
TIMEOUT_RCS = {"124", "137"}


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def row_of(out: Path, fields: list[str]) -> dict:
    name, framework, shape, precision, rc, wall = (fields + [""] * 6)[:6]
    d = load(out / f"{name}.json")
    row = {"step": name, "framework": framework, "shape": shape, "precision": precision, "rc": rc,
           "wall_s": float(wall) if wall else None}
    usable = (d.get("measured_steps") or 0) > 0
    if d.get("status") == "skipped":
        status, reason = "skipped", d.get("reason", "")
    elif rc == "0" and d.get("status") == "ok":
        status, reason = "ok", ""
    else:
        why = ("timed out" if rc in TIMEOUT_RCS else f"exit code {rc}") + (f", JSON status {d.get('status')!r}"
                                                                          if d else ", no JSON written")
        status = "partial" if usable else ("timeout" if rc in TIMEOUT_RCS else "failed")
        reason = d.get("reason") or why
        if usable:
            reason = f"{why}: {d['measured_steps']} measured step(s)"
    row.update(status=status, reason=reason)
    for k in FIGURES if status in ("ok", "partial") else ():
        row[k] = d.get(k)
    for k in ("params", "setup_s", "device", "precision_detail", "prompts", "group", "prompt_len", "new_tokens",
              "micro_batch"):
        if k in d:
            row[k] = d[k]
    return row


def fmt(v, nd=3) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, float):
        return f"{v:,.{nd}f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    meta = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    versions = load(out / "versions.json")
    tsv = out / "steps.tsv"
    lines = [ln.split("\t") for ln in tsv.read_text().splitlines() if ln.strip()] if tsv.exists() else []
    rows = [row_of(out, f) for f in lines]

    ratios = []
    keyed = {(r["framework"], r["shape"], r["precision"]): r for r in rows}
    for (fw, shape, precision), k in keyed.items():
        if fw != "klrl":
            continue
        t = keyed.get(("trl", shape, precision))
        if t is None:
            continue
        entry = {"shape": shape, "precision": precision, "klrl_step": k["step"], "trl_step": t["step"]}
        if k["status"] in ("ok", "partial") and t["status"] in ("ok", "partial"):
            for key, _ in RATIOS:
                a, b = t.get(key), k.get(key)
                num = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                entry[key] = round(a / b, 2) if num else None
            entry["status"] = "ok" if k["status"] == t["status"] == "ok" else "partial"
        else:
            entry["status"] = f"n/a (klrl {k['status']}, trl {t['status']})"
        ratios.append(entry)

    dev = versions.get("gpu") or versions.get("platform") or "?"
    md = [f"## klrl vs TRL GRPOTrainer: {dev}",
          "",
          f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}, "
          f"trl {versions.get('trl', '?')}; " + ", ".join(f"{k}={v}" for k, v in meta.items()),
          "",
          "Medians over the measured steps (after the warm-up). update = everything but sampling: reference forward, "
          "policy forward/backward, clipping, AdamW step. tok/s = sampled (completion) tokens per second.",
          ""]
    hdr = ["step", "framework", "shape", "precision", "status", "steps", "step s", "generate s", "update s",
           "tokens", "gen tok/s", "update tok/s", "gen peak GiB", "update peak GiB", "wall s"]
    md += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        md.append("| " + " | ".join(fmt(c) for c in (
            r["step"], r["framework"], r["shape"], r["precision"], r["status"], r.get("measured_steps"),
            r.get("step_s"), r.get("generate_s"), r.get("train_s"), r.get("completion_tokens"),
            r.get("generate_tokens_per_s"), r.get("train_tokens_per_s"), r.get("generate_peak_gib"),
            r.get("train_peak_gib"), r.get("wall_s"))) + " |")
    notes = [f"- {r['step']}: {r['status']}: {r['reason']}" for r in rows if r["reason"]]
    if notes:
        md += [""] + notes
    if ratios:
        md += ["", "TRL / klrl (> 1: TRL takes longer or uses more memory):", ""]
        rh = ["shape", "precision", "status"] + [label for _, label in RATIOS]
        md += ["| " + " | ".join(rh) + " |", "|" + "---|" * len(rh)]
        md += ["| " + " | ".join(fmt(c, 2) for c in [e["shape"], e["precision"], e["status"]]
                                 + [e.get(key) for key, _ in RATIOS]) + " |" for e in ratios]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    summary = {"meta": meta, "versions": versions, "rows": rows, "ratios": ratios}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text, end="")
    return 1 if any(r["status"] in ("failed", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
