#!/usr/bin/env bash
# The issue-2 GPU evidence: `inferforge optimize` on ResNet-50, BERT-base and the built-in default, on one GPU.
# Peers (eager fp32, eager bf16, eager bf16 channels-last) are candidates of the same runs, so every ratio in
# results.json is measured side by side. Usage (on the GPU machine, from the repo root):
#   bash benchmarks/gpu_optimize.sh resnet50|bert|default OUT_DIR
set -euo pipefail
which=$1
out=${2:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
case $which in
  resnet50)
    python3 -m inferforge.cli optimize --model torchvision.models:resnet50 --data random:512:3x224x224 \
      --task classification --batch-sizes 1,256 --out "$out/resnet50" --quiet ;;
  bert)
    python3 benchmarks/make_bert_base.py /tmp/bench ${TOKENIZER_DIR:-}
    python3 -m inferforge.cli optimize --model /tmp/bench/bert-base --data /tmp/bench/bert-seq128.npz \
      --task embedding --batch-sizes 1,64 --out "$out/bert" --quiet ;;
  default)
    python3 -m inferforge.cli optimize --out "$out/default" --quiet ;;
  *) echo "unknown benchmark $which" >&2; exit 2 ;;
esac
