# Sourced by the GPU-machine scripts (gpu_check.sh, gpu_experiment.sh): environment, $OUT, the
# build of amgsn against the torch there. Expects OUT_DEFAULT set by the caller.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/$OUT_DEFAULT}
mkdir -p "$OUT"
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the GPU it sees (torch's detection).
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FORCE_CUDA=1
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

step "build (pip install --no-build-isolation --no-deps -e .)"
$PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
$PY -m pip install -q pytest pytest-benchmark >/dev/null 2>&1 || true
