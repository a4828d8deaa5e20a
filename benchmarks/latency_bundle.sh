#!/usr/bin/env bash
# The latency benchmark's bundle (benchmarks/results/latency_cpu.json): the default CPU segmenter (1008x756
# input) trained briefly on synthetic slides, with the default crop classifier architecture attached with
# untrained weights. Latency depends on the architectures and on the cells returned, not on how well they are
# trained. Usage: bash benchmarks/latency_bundle.sh [OUT=runs/latency]; then
#   python benchmarks/latency.py --bundle runs/latency/seg/bundle --out benchmarks/results --threshold 0.1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/latency}"
PY="${PYTHON:-.venv/bin/python}"
[[ -f "$OUT/train-task/annotations.xml" ]] || "$PY" -m trainer synth --out "$OUT/train-task" --images 80 --seed 5
"$PY" -m trainer train-segmenter --data "$OUT/train-task" --out "$OUT/seg" --max-minutes "${SEG_MINUTES:-12}"
"$PY" benchmarks/attach_untrained_classifier.py "$OUT/seg/bundle" "$OUT/train-task"
