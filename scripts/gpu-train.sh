#!/usr/bin/env bash
# Train the shipped models on one CUDA GPU in a fixed wall-clock window.
#
# Prerequisite: `diffvoice train --prepare runs/data` (the packed chit-chat data and tokenizer).
# 1. a short probe measures steps/s of the AR recipe on this GPU;
# 2. the diffusion model from scratch trains in the background for the whole window, while the
#    AR baseline trains for half the window and the AR->diffusion adaptation for the other half
#    (equal compute: scratch steps = AR steps + adaptation steps);
# 3. the better diffusion model (held-out ELBO perplexity) and the AR baseline (its best
#    held-out checkpoint) are packed into $OUT as ship.tgz.part-* (15 MB pieces).
# PLAN=continue instead spends the whole window on the shipped dv-small (`train-dv-small-adapt2`,
# the adapted model, which won the comparison) and packs it as ship/dv-small.
# PLAN=distill first has the AR baseline write replies to every training prompt on the GPU
# (`diffvoice distill`), then trains the shipped dv-small on them (`train-dv-small-distill`)
# for the rest of the window and packs its last checkpoint (its held-out ELBO on people's replies
# is not what this stage improves) as ship/dv-small.
# Usage: scripts/gpu-train.sh [WINDOW_SECONDS]
#   env: OUT (default runs/gpu-out), DEVICE (cuda), PROBE_STEPS (60), EXTRA (more --opt flags),
#        PLAN (compare | continue | distill), DISTILL_EXAMPLES (all training prompts),
#        PROBE_RECIPE (train-dv-small-ar; the recipe whose speed sizes the run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-out}; DEVICE=${DEVICE:-cuda}; PROBE_STEPS=${PROBE_STEPS:-60}
EXTRA=${EXTRA:-}; PLAN=${PLAN:-compare}; DISTILL_EXAMPLES=${DISTILL_EXAMPLES:-1000000}
PROBE_RECIPE=${PROBE_RECIPE:-train-dv-small-ar}
WINDOW=${1:-270}
rm -rf runs/ship runs/ship.tgz && mkdir -p "$OUT" runs/ship
SEQ_LOG=$OUT/train-seq.log
# the run's best held-out checkpoint, or its final one when no evaluation beat it
PICK='
import json, os, sys
def pick(r):
    ppl = lambda f: json.load(open(f"{r}/{f}/config.json"))["training"]["test_ppl"]
    return f"{r}/best" if os.path.exists(f"{r}/best") and ppl("best") < ppl("model") else f"{r}/model"
'
pick() { python3 -c "$PICK
print(pick(sys.argv[1]))" "$1"; }
train() { python3 -m agent.cli train --device "$DEVICE" $EXTRA "$@"; }

{ nvidia-smi --query-gpu=name,memory.total --format=csv || true; } > "$SEQ_LOG" 2>&1
rm -rf runs/probe
train --recipe "$PROBE_RECIPE" --opt max_steps="$PROBE_STEPS" --opt run_dir=runs/probe \
  --opt eval_every=100000 --opt ckpt_every=100000 --opt log_every=5 >> "$SEQ_LOG" 2>&1
STEPS_PER_S=$(python3 - <<'PY'
import json
s = json.load(open("runs/probe/summary.json"))
rows = [json.loads(l) for l in open("runs/probe/log.jsonl") if '"tokens_per_s"' in l]
tail = rows[len(rows) // 2:]  # skip start-up
rate = sum(r["tokens_per_s"] for r in tail) / len(tail)
print(rate / (s["tokens_this_session"] / s["steps_done"]))
PY
)
pack() { tar czf runs/ship.tgz -C runs ship && split -b 15M runs/ship.tgz "$OUT/ship.tgz.part-"
  ls -la "$OUT"; }
if [ "$PLAN" = distill ]; then
  T0=$(date +%s)
  python3 -m agent.cli distill --device "$DEVICE" --examples "$DISTILL_EXAMPLES" --batch-size 512 \
    --out runs/data-distill > "$OUT/distill.log" 2>&1
  LEFT=$((WINDOW - $(date +%s) + T0))
  STEPS=$(python3 -c "print(max(100, int($STEPS_PER_S * 0.9 * $LEFT) // 50 * 50))")
  echo "probe ${STEPS_PER_S} steps/s, ${LEFT} s left -> distill ${STEPS} steps" | tee -a "$SEQ_LOG"
  rm -rf runs/dv-small-distill
  train --recipe train-dv-small-distill --opt max_steps=$STEPS \
    --max-minutes "$(python3 -c "print(($LEFT + 30) / 60)")" > "$OUT/train-distill.log" 2>&1
  cp -r runs/dv-small-distill/model runs/ship/dv-small
  cp runs/dv-small-distill/log.jsonl runs/ship/dv-small-distill.log.jsonl
  cp runs/data-distill/meta.json runs/ship/data-distill-meta.json
  cat runs/dv-small-distill/summary.json | tee "$OUT/summary.txt"
  pack
  exit 0
fi
if [ "$PLAN" = continue ]; then
  # one process alone on the GPU; the probe ran the AR recipe (the same shapes and batch size)
  STEPS=$(python3 -c "print(max(100, int($STEPS_PER_S * 0.9 * $WINDOW) // 50 * 50))")
  echo "probe ${STEPS_PER_S} steps/s -> continue dv-small ${STEPS} steps" | tee -a "$SEQ_LOG"
  rm -rf runs/dv-small-adapt2
  train --recipe train-dv-small-adapt2 --opt max_steps=$STEPS \
    --max-minutes "$(python3 -c "print(($WINDOW + 30) / 60)")" > "$OUT/train-continue.log" 2>&1
  python3 -c "$PICK
import shutil
shutil.copytree(pick('runs/dv-small-adapt2'), 'runs/ship/dv-small')
shutil.copy('runs/dv-small-adapt2/log.jsonl', 'runs/ship/dv-small-adapt2.log.jsonl')
print(open('runs/dv-small-adapt2/summary.json').read())" | tee "$OUT/summary.txt"
  pack
  exit 0
fi
# two processes share the GPU: assume each gets ~55% of the probe's rate
STEPS=$(python3 -c "print(max(200, int($STEPS_PER_S * 0.55 * $WINDOW) // 100 * 100))")
HALF=$((STEPS / 2))
echo "probe ${STEPS_PER_S} steps/s -> scratch ${STEPS} steps, AR ${HALF} + adaptation ${HALF}" \
  | tee runs/ship/plan.txt >> "$SEQ_LOG"
MIN=$(python3 -c "print(($WINDOW + 30) / 60)")
HALF_MIN=$(python3 -c "print(($WINDOW / 2 + 15) / 60)")
rm -rf runs/dv-small runs/dv-small-ar runs/dv-small-adapt
train --recipe train-dv-small --opt max_steps=$STEPS --max-minutes "$MIN" \
  > "$OUT/train-scratch.log" 2>&1 &
SCRATCH=$!
train --recipe train-dv-small-ar --opt max_steps=$HALF --max-minutes "$HALF_MIN" >> "$SEQ_LOG" 2>&1
train --recipe train-dv-small-adapt --opt max_steps=$HALF --init-from "$(pick runs/dv-small-ar)" \
  --max-minutes "$HALF_MIN" >> "$SEQ_LOG" 2>&1
wait $SCRATCH

python3 -c "$PICK
$(cat <<'PY'
import shutil
names = ("dv-small", "dv-small-adapt", "dv-small-ar")
runs = {n: json.load(open(f"runs/{n}/summary.json")) for n in names}
winner = min(("dv-small", "dv-small-adapt"), key=lambda n: runs[n]["test_ppl"])
for n in names:
    shutil.copy(f"runs/{n}/log.jsonl", f"runs/ship/{n}.log.jsonl")
json.dump({"runs": runs, "winner": winner}, open("runs/ship/summaries.json", "w"), indent=2)
shutil.copytree(pick(f"runs/{winner}"), "runs/ship/dv-small")
shutil.copytree(pick("runs/dv-small-ar"), "runs/ship/dv-small-ar")
print(json.dumps({"runs": runs, "winner": winner}, indent=1))
PY
)" | tee "$OUT/summary.txt"
pack
