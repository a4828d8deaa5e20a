#!/usr/bin/env bash
# The PBC -> BCCD classifier benchmark on a CUDA machine (same code and seeds as the CPU run; the two stain
# settings run side by side). From the repository root:
#   bash benchmarks/gpu_classifier.sh PBC_DIR BCCD_DIR OUT_DIR
# Writes classifier_pbc_to_bccd_gpu_{none,reinhard}.json + confusion PNGs + logs, packed as OUT_DIR/classifier_gpu.tgz.
set -uo pipefail
PBC=${1:-../shared/data/pbc-sample}; BCCD=${2:-../shared/data/bccd-wbc}; DEST=${3:-benchmarks/results}
export PYTHONUNBUFFERED=1
if ! python3 -c "import nuclio_sdk, pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
RES=$(mktemp -d)
for s in none reinhard; do
  timeout "${LIMIT_S:-380}" python3 benchmarks/classifier_pbc_to_bccd.py --pbc "$PBC" --bccd "$BCCD" --out "$RES" \
    --stains $s --name classifier_pbc_to_bccd_gpu_$s --device cuda --threads 6 > "$RES/log_$s.txt" 2>&1 &
done
wait
grep -h "ROW\|MET" "$RES"/log_*.txt
tar czf "$DEST/classifier_gpu.tgz" -C "$RES" .
