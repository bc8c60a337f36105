#!/bin/sh
# The trainer job: train a language model, export it as the next version of $RNNSERVE_MODEL_NAME into
# the model repository, exit. Given arguments, runs them instead (e.g. `rnnserve train classifier ...`).
#
#   RNNSERVE_MODEL_NAME  bundle name (default py)
#   RNNSERVE_TRAIN_ARGS  more `rnnserve train lm` flags, e.g. "--data /data/corpus.txt --epochs 2"
#                        (default: the demo's LSTM on the Python standard library's source)
#   RNNSERVE_REPO        the model repository (default /models: the volume the server reads)
set -eu
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
run=$(mktemp -d)
# shellcheck disable=SC2086  # RNNSERVE_TRAIN_ARGS is a list of flags
rnnserve train lm --out "$run" --no-progress ${RNNSERVE_TRAIN_ARGS:-}
rnnserve export "$run/checkpoint.pt" --repo "${RNNSERVE_REPO:-/models}" --name "${RNNSERVE_MODEL_NAME:-py}"
rm -rf "$run"
