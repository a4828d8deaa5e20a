#!/usr/bin/env bash
# GPU latency of the CVAT function (issue 3's GPU target: p50 <= 0.1 s per 4032x3024 slide), from the
# repository root of a CUDA machine with torch + torchvision installed:
#   bash benchmarks/gpu_latency.sh [BUNDLE] [OUT]
# Where the machine has no package index, put the nuclio-sdk and pycocotools wheels in .whl/; they are installed
# from there. Writes latency_cuda.json and latency_cuda.png into OUT (default benchmarks/results).
set -euo pipefail
BUNDLE=${1:-runs/default-cpu/run/bundle}
DEST=${2:-benchmarks/results}
export PYTHONUNBUFFERED=1
if ! python3 -c "import nuclio_sdk, pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
python3 benchmarks/latency.py --bundle "$BUNDLE" --out "$DEST" --device cuda --threshold 0.1 \
  --slides 10 --rounds 5 --baseline-slides 10 --memory-requests 40 --threads 4
