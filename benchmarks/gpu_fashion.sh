#!/usr/bin/env bash
# One GPU session for issue 9 (and the CUDA check of issue 8), within about 8 minutes:
#   1. `--preset fashion` (VGG3 on Fashion-MNIST, the paper's grid in the preset's order) for up to
#      $BUDGET seconds: it resumes where it stops, so a later session continues it;
#   2. the (T, M) check of benchmarks/fashion_tm.py (T = 100 with M = 30, 60, 100) beside it;
#   3. tests/test_cuda.py.
# The three share the GPU. Results (no weights) are packed into $OUT/fashion-gpu.tgz with the logs.
# Usage, repository root, torch with CUDA:  bash benchmarks/gpu_fashion.sh FASHION_DIR OUT_DIR
set -u
DATA=${1:?Fashion-MNIST directory}
OUT=${2:?output directory}
BUDGET=${BUDGET:-470}
WORK=${WORK:-/tmp/qmargin-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
(timeout "$BUDGET" "$PY" -c "
from qmargin.experiments.mcel import run_mcel_reproduction
run_mcel_reproduction(preset='fashion', out_dir='$WORK/fashion', data_dir='$DATA',
                      results_dir='$WORK/fashion-results', log=print)
" >"$OUT/fashion.log" 2>&1; echo "exit $?" >>"$OUT/fashion.log") &
(timeout "$BUDGET" "$PY" benchmarks/fashion_tm.py --out "$WORK/tm" --data-dir "$DATA" \
    --variants 100:30,100:60,100:100 >"$OUT/tm.log" 2>&1; echo "exit $?" >>"$OUT/tm.log") &
(timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs >"$OUT/test_cuda.log" 2>&1
 echo "exit $?" >>"$OUT/test_cuda.log") &
wait
tar czf "$OUT/fashion-gpu.tgz" --exclude='*.safetensors' -C "$WORK" .
tail -n 3 "$OUT"/*.log
