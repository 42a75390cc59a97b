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
# LLaDA-8B-shaped random bf16 weights: prompt 512, reply 64, block 32, 8 tokens/step, 16
# concurrent requests, AR baseline of the same shape; compiled, CUDA-graphed steps
# (configs/gpu-llada-8b), then eager steps for comparison.
bench_llm() {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/gpu.txt"
    local run=("$PY" -m agent.cli bench-llm --config gpu-llada-8b --preset gpu-llada-8b)
    "${run[@]}" --json "$OUT/bench-llm.json" | tee "$OUT/bench-llm.txt"
    "${run[@]}" --set llm.engine.compile=false --set llm.engine.cuda_graphs=false \
        --json "$OUT/bench-llm-eager.json" | tee "$OUT/bench-llm-eager.txt"
    if "$PY" -c "import pytest" 2>/dev/null; then
        "$PY" -m pytest -q -m gpu tests/test_engine.py | tee "$OUT/test-engine-gpu.txt" || true
    fi
}
# ---- end bench-llm ----------------------------------------------------------------------------

ensure_python_deps
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(bench_llm)
for section in "${sections[@]}"; do
    "$section"
done
