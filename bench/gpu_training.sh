#!/usr/bin/env bash
# Training on a CUDA machine (issue 4): the cuDNN + mixed-precision path, and RNN(tanh) vs LSTM vs GRU on
# the same budget (same data, size, hyper-parameters and number of epochs) on Tiny Shakespeare, char level.
#
#   bash bench/gpu_training.sh DATA_DIR OUT_DIR        # DATA_DIR holds tiny-shakespeare/input.txt
#
# Env: EPOCHS (default 20), CELLS (default "rnn_tanh lstm gru"), RNNSERVE (default "python3 -m rnnserve").
set -euo pipefail
DATA=${1:?usage: gpu_training.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: gpu_training.sh DATA_DIR OUT_DIR}
EPOCHS=${EPOCHS:-20}
RNNSERVE=${RNNSERVE:-python3 -m rnnserve}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "bf16", torch.cuda.is_bf16_supported())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError as exc:
    print("onnxruntime: not importable:", exc)
PY
common=(--data "$DATA/tiny-shakespeare/input.txt" --min-count 1 --layers 2 --hidden 512 --emb 64 --dropout 0.25
        --batch-size 64 --bptt 128 --optimizer adamw --lr 2e-3 --weight-decay 0.01 --schedule cosine
        --warmup-steps 200 --clip 1.0 --max-eval-tokens 0 --device cuda --no-progress --no-plot)
# The fp16 path (GradScaler) and deterministic kernels: a short smoke run.
$RNNSERVE train lm "${common[@]}" --cell lstm --amp fp16 --deterministic --max-steps 60 --sample 0 \
    --out "$OUT/smoke-fp16" 2>&1 | tail -2
for cell in ${CELLS:-rnn_tanh lstm gru}; do
    start=$(date +%s.%N)
    $RNNSERVE train lm "${common[@]}" --cell "$cell" --amp bf16 --epochs "$EPOCHS" --sample 200 \
        --out "$OUT/ts-$cell" > "$OUT/ts-$cell.log" 2>&1
    end=$(date +%s.%N)
    python3 - "$OUT/ts-$cell" "$cell" "$start" "$end" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if "val_loss" in l]
best = min(rows, key=lambda r: r["val_loss"])
print(f"{sys.argv[2]:9s} best val loss {best['val_loss']:.4f} nats/char at epoch {best['epoch']}, "
      f"last {rows[-1]['val_loss']:.4f}, wall {float(sys.argv[4]) - float(sys.argv[3]):.0f} s")
PY
done
