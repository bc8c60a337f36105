#!/usr/bin/env bash
# Every check this project runs on a lent CUDA machine, in one go (figures: docs/results.md, "On a GPU").
#
#   bash bench/gpu_session.sh DATA_DIR OUT_DIR
#
# The machine's image has PyTorch but a CPU-only onnxruntime and an older grpcio, so the command that calls
# this first installs wheels carried in .whl/ (this package, onnxruntime-gpu, grpcio, protobuf, grpcio-*)
# into /tmp/site. DATA_DIR holds wikitext-2/{valid,test}.txt. Each step has its own time limit and the
# script goes on after a failure, so one broken check does not hide the others.
set -uo pipefail
DATA=${1:?usage: gpu_session.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: gpu_session.sh DATA_DIR OUT_DIR}
export PYTHONUNBUFFERED=1
# onnxruntime-gpu finds CUDA 13 / cuDNN 9 in the nvidia-* wheels that PyTorch's environment ships.
SITE=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
NVLIBS=$(find "$SITE/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.txt, report the exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? ($(tail -c 2000 "$OUT/$name.txt" | tail -n 25))"
}
python3 -c "import onnxruntime as o, torch; print('ort', o.__version__, o.get_available_providers(), \
'torch', torch.__version__, torch.cuda.get_device_name())"
step export 120 python3 bench/gpu_check_export.py
step serving 180 python3 bench/gpu_check_serving.py --out "$OUT/serving.json"
wt2=(--config docs/configs/wikitext2-word.toml --train-file "$DATA/wikitext-2/valid.txt"
     --test-file "$DATA/wikitext-2/test.txt" --device cuda --amp bf16 --no-progress --no-plot --sample 0)
for cell in lstm gru rnn_tanh; do
    step "wt2-$cell" 75 python3 -m rnnserve train lm "${wt2[@]}" --cell "$cell" --out "/tmp/wt2-$cell"
done
