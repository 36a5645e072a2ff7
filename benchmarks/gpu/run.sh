#!/usr/bin/env bash
# klrl vs Hugging Face TRL GRPOTrainer on one GPU, offline, from a source copy of the repository. One command:
#     bash benchmarks/gpu/run.sh              # GPU: Qwen2.5-0.5B and -1.5B shapes, random init (~7 min on one H200)
#     SMOKE=1 bash benchmarks/gpu/run.sh      # CPU check of this whole script: shape "smoke", tiny lengths (seconds)
# Steps: (0) install the carried pure-Python wheels ($WHEELS, default benchmarks/gpu/wheels, filled by
# fetch_wheels.sh) into a private folder $SITE with pip --no-index --no-deps --target and put $SITE and the
# repository on PYTHONPATH; (1) record nvidia-smi and package versions; (2) per shape, klrl's generate + update
# (klrl_bench.py, through klrl_adapter.py) and the same work through TRL (trl_bench.py); (3) if the budget allows,
# both again in pure bf16 at 0.5B; (4) summarize.py: $OUT/summary.md and $OUT/summary.json, TRL/klrl ratios.
# Every step runs under `timeout`, writes $OUT/<step>.json (figures, or why it failed / was skipped) and
# $OUT/<step>.log; a failing step does not stop the others. Exit status: summarize.py's (1 if a step failed).
# Env (defaults in brackets):
#   OUT [benchmarks/gpu/out]   results          WORK [/tmp/klrl-gpu-work]   TRL's saved random models (deleted)
#   BUDGET_S [420; smoke 240]  wall-clock cap for the whole run, wheel install and model init included: a step
#                              starts only with MIN_STEP_S [30; smoke 10] left, and no step's timeout outlives it
#   WHEELS [benchmarks/gpu/wheels]   SITE [/tmp/klrl-gpu-site]   SKIP_WHEELS=1: use the interpreter's own packages
#   PYTHON [python3]   SHAPES_RUN ["qwen2.5-0.5b qwen2.5-1.5b"; smoke "smoke"]   EXTRAS [1; smoke 0]: the bf16 pair
#   PROMPTS GROUP MICRO PROMPT_LEN NEW_TOKENS WARMUP STEPS [8 8 8 256 256 1 2; smoke 2 4 4 16 8 1 2]
set -u
T0=$SECONDS
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-$KIT/out}
WORK=${WORK:-${TMPDIR:-/tmp}/klrl-gpu-work}
SITE=${SITE:-${TMPDIR:-/tmp}/klrl-gpu-site}
WHEELS=${WHEELS:-$KIT/wheels}
SKIP_WHEELS=${SKIP_WHEELS:-0}
if [ "$SMOKE" = 1 ]; then
    DEV=cpu; BUDGET_S=${BUDGET_S:-240}; MIN_STEP_S=${MIN_STEP_S:-10}; SHAPES_RUN=${SHAPES_RUN:-smoke}
    EXTRAS=${EXTRAS:-0}; PROMPTS=${PROMPTS:-2}; GROUP=${GROUP:-4}; MICRO=${MICRO:-4}
    PROMPT_LEN=${PROMPT_LEN:-16}; NEW_TOKENS=${NEW_TOKENS:-8}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny matrices on a shared CPU: threads cost more than they give
else
    DEV=cuda; BUDGET_S=${BUDGET_S:-420}; MIN_STEP_S=${MIN_STEP_S:-30}
    SHAPES_RUN=${SHAPES_RUN:-qwen2.5-0.5b qwen2.5-1.5b}
    EXTRAS=${EXTRAS:-1}; PROMPTS=${PROMPTS:-8}; GROUP=${GROUP:-8}; MICRO=${MICRO:-8}
    PROMPT_LEN=${PROMPT_LEN:-256}; NEW_TOKENS=${NEW_TOKENS:-256}
fi
WARMUP=${WARMUP:-1}; STEPS=${STEPS:-2}

# Per-step timeouts (seconds; each is also cut to what is left of BUDGET_S). On one H200 the 0.5B pair was sized to
# finish in ~1-2 min each, the 1.5B pair in ~2-3 min (model init on the GPU, TRL also saves and reloads the model).
limit_for() {  # limit_for FRAMEWORK SHAPE
    [ "$SMOKE" = 1 ] && { echo "${T_SMOKE:-120}"; return; }
    case "$1:$2" in
        klrl:qwen2.5-0.5b) echo "${T_KLRL_05B:-120}" ;;
        trl:qwen2.5-0.5b) echo "${T_TRL_05B:-150}" ;;
        klrl:qwen2.5-1.5b) echo "${T_KLRL_15B:-150}" ;;
        trl:qwen2.5-1.5b) echo "${T_TRL_15B:-180}" ;;
        *) echo 180 ;;
    esac
}

mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd)
if [ -f "$OUT/steps.tsv" ]; then  # the previous run's files (only those: OUT may hold other things)
    cut -f1 "$OUT/steps.tsv" | while read -r n; do [ -n "$n" ] && rm -f "$OUT/$n.json" "$OUT/$n.log"; done
fi
rm -f "$OUT"/{summary.md,summary.json,versions.json,nvidia-smi.txt,run.log,steps.tsv}
exec > >(tee -a "$OUT/run.log") 2>&1
echo "== benchmarks/gpu/run.sh $(date -u +%FT%TZ) SMOKE=$SMOKE device=$DEV BUDGET_S=$BUDGET_S OUT=$OUT REPO=$REPO"

# (0) Wheels: the pure-Python packages the GPU machine lacks (hydra-core, omegaconf, antlr4 4.9.3, trl, datasets, ...),
#     only those whose tags this interpreter accepts (multiprocess comes as py311 and py312 wheels), one per project.
if [ "$SKIP_WHEELS" = 1 ]; then
    echo "== wheels: SKIP_WHEELS=1, using $PY's own packages"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
elif ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "!! no wheels in $WHEELS (run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable, or set WHEELS=dir);"
    echo "!! continuing with $PY's own packages: steps whose imports are missing will fail or be skipped"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    mapfile -t PICKED < <("$PY" - "$WHEELS" <<'PY'
import sys
from pathlib import Path
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version
except ImportError:  # no `packaging`: every wheel whose python tag is py3 or this interpreter's
    tag = "py%d%d" % sys.version_info[:2]
    for w in sorted(Path(sys.argv[1]).glob("*.whl")):
        if w.name.split("-")[-3] in ("py3", "py2.py3", tag):
            print(w)
    sys.exit()
ok, best = set(sys_tags()), {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(w.name)
    if not ok & set(tags):
        print(f"   skipping {w.name}: not for this interpreter", file=sys.stderr)
    elif name not in best or version > best[name][0]:
        best[name] = (version, w)
for _, w in sorted(best.values(), key=lambda vw: vw[1].name):
    print(w)
PY
)
    echo "== wheels: installing ${#PICKED[@]} from $WHEELS into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${PICKED[@]}"; then
        echo "!! pip install failed; unpacking the wheels with zipfile instead (pure-Python wheels: same files)"
        mkdir -p "$SITE"
        for w in "${PICKED[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" || echo "!! could not unpack $w"; done
    fi
    export SITE PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_DISABLED=true
[ -n "${HF_HOME:-}" ] || { HF_HOME=$WORK/hf_home; OWN_HF_HOME=1; }  # nothing is downloaded; only caches land there
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HOME

# (1) Machine and versions.
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; head -n 12 "$OUT/nvidia-smi.txt"; fi
timeout 120 "$PY" "$KIT/env_info.py" > "$OUT/versions.json" || echo '{}' > "$OUT/versions.json"
cat "$OUT/versions.json"
# env_info.py imported trl and datasets: "MISSING (...)" there means the TRL steps cannot run
TRL_WHY=$("$PY" - "$OUT/versions.json" 2>&1 <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
bad = [f"{m}: {v.get(m, 'MISSING (env_info.py failed)')}" for m in ("trl", "datasets")
       if str(v.get(m, "MISSING")).startswith("MISSING")]
print("; ".join(bad))
sys.exit(1 if bad else 0)
PY
)
TRL_RC=$?
[ "$TRL_RC" = 0 ] || echo "== TRL steps will be skipped: trl not importable ($TRL_WHY)"

# (2)-(3) Steps.
: > "$OUT/steps.tsv"
stub() {  # stub JSON_PATH STATUS REASON: the JSON of a step that wrote none (failed before its first write, skipped)
    "$PY" -c 'import json, sys; json.dump({"status": sys.argv[2], "reason": sys.argv[3]}, open(sys.argv[1], "w"))' \
        "$1" "$2" "$3" 2>/dev/null || printf '{"status": "%s"}\n' "$2" > "$1"
}
record() {  # record NAME FRAMEWORK SHAPE PRECISION RC WALL
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"
}
step() {  # step NAME FRAMEWORK SHAPE PRECISION SCRIPT [ARGS...]  (the script gets --out $OUT/NAME.json)
    local name=$1 fw=$2 shape=$3 prec=$4 script=$5
    shift 5
    local json=$OUT/$name.json left limit
    left=$(( BUDGET_S - (SECONDS - T0) ))
    if [ "$fw" = trl ] && [ "$TRL_RC" != 0 ]; then
        echo "== [$name] skipped: trl not importable"
        stub "$json" skipped "trl not importable ($TRL_WHY); install the bench extra or carry the wheels"
        record "$name" "$fw" "$shape" "$prec" skipped 0
        return
    fi
    if (( left < MIN_STEP_S )); then
        echo "== [$name] skipped: ${left}s of BUDGET_S=$BUDGET_S left (a step needs MIN_STEP_S=$MIN_STEP_S)"
        stub "$json" skipped "budget: ${left}s of BUDGET_S=${BUDGET_S}s left"
        record "$name" "$fw" "$shape" "$prec" skipped 0
        return
    fi
    limit=$(limit_for "$fw" "$shape")
    (( limit > left )) && limit=$left
    echo "== [$name] $fw $shape $prec (timeout ${limit}s, ${left}s of budget left)"
    local t=$SECONDS
    timeout -k 10 "$limit" "$PY" "$KIT/$script" --shape "$shape" --precision "$prec" --device "$DEV" \
        --prompts "$PROMPTS" --group "$GROUP" --micro "$MICRO" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" \
        --warmup "$WARMUP" --steps "$STEPS" "$@" --out "$json" > "$OUT/$name.log" 2>&1
    local rc=$?
    local wall=$(( SECONDS - t ))
    record "$name" "$fw" "$shape" "$prec" "$rc" "$wall"
    if [ "$rc" = 0 ]; then
        echo "   ok ${wall}s"
        grep -E "^\[(klrl|trl)_bench\] (done|step)" "$OUT/$name.log" | tail -n 3 | sed 's/^/   | /'
    else
        echo "   FAILED rc=$rc after ${wall}s$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (timeout)')"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
        [ -s "$json" ] || stub "$json" failed \
            "exit code $rc before any result; see $name.log: $(tail -n 1 "$OUT/$name.log")"
    fi
}
tag_of() { case "$1" in qwen2.5-0.5b) echo 05b ;; qwen2.5-1.5b) echo 15b ;; *) echo "${1//[^A-Za-z0-9]/_}" ;; esac; }

for shape in $SHAPES_RUN; do
    tag=$(tag_of "$shape")
    step "klrl_$tag" klrl "$shape" mixed klrl_bench.py
    step "trl_$tag" trl "$shape" mixed trl_bench.py --workdir "$WORK/trl_$tag"
    rm -rf "${WORK:?}/trl_$tag"
done
if [ "$EXTRAS" = 1 ]; then  # pure bf16 weights on both sides, the first shape only
    shape=${SHAPES_RUN%% *}; tag=$(tag_of "$shape")
    step "klrl_${tag}_bf16" klrl "$shape" bf16 klrl_bench.py
    step "trl_${tag}_bf16" trl "$shape" bf16 trl_bench.py --workdir "$WORK/trl_${tag}_bf16"
fi
rm -rf "$WORK"/trl_*  # only what this script put there (TRL's saved random models: GBs)
[ "${OWN_HF_HOME:-0}" = 1 ] && rm -rf "$HF_HOME"
rmdir "$WORK" 2>/dev/null

# (4) Summary.
echo "== $(( SECONDS - T0 ))s in all (BUDGET_S=$BUDGET_S)"
"$PY" "$KIT/summarize.py" "$OUT" "smoke=$SMOKE" "device=$DEV" "budget_s=$BUDGET_S" "total_s=$(( SECONDS - T0 ))" \
    "prompts=$PROMPTS" "group=$GROUP" "micro=$MICRO" "prompt_len=$PROMPT_LEN" "new_tokens=$NEW_TOKENS" \
    "warmup=$WARMUP" "steps=$STEPS"
