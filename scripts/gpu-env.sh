# Sourced by the scripts/gpu-*.sh benchmarks on a lent GPU machine: $OUT, the transformers 5.24 wheel
# from .whl/ (the GPU image ships an older transformers) on PYTHONPATH, and the GPU's name in $OUT/gpu.txt.
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
