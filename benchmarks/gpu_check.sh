#!/usr/bin/env bash
# One call on the GPU machine (docs/method.md §9): build amgsn against the torch there, run the CUDA tests,
# run the GPU benchmarks, write JSON + a short table under $OUT. Well under 10 minutes on an H100.
#   device tool:  bash benchmarks/gpu_check.sh        (locally: OUT=/tmp/gpu bash benchmarks/gpu_check.sh)
set -uo pipefail
OUT_DEFAULT=runs/gpu_check
source "$(dirname "$0")/_gpu_env.sh"

if $PY -m amgsn bench-step --help >/dev/null 2>&1; then
  # Variants fused, fused_bank (saliency bank, warm bank, P = bench_step.DEFAULT_REFRESH), reference,
  # mae_random; the JSON holds fused_bank_over_mae_random and reference_over_fused_bank. Issue 19's GPU
  # target (fused_bank / mae_random <= 1.08) is also measured at P = 0.25 (bench_step_bank025.json).
  step "training step: ViT-B/16, 224 px, batch 256, bf16 (fused, fused_bank, reference, mae_random)"
  timeout 260 $PY -m amgsn bench-step --model vit_base --img-size 224 --patch-size 16 --batch-size 256 \
      --ratio-range 0.5 0.9 --device cuda --steps 12 --json > "$OUT/bench_step.json" 2> "$OUT/bench_step.log"
  [ $? -eq 0 ] && cat "$OUT/bench_step.json" || { tail -20 "$OUT/bench_step.log"; status=1; }
  timeout 120 $PY -m amgsn bench-step --model vit_base --img-size 224 --patch-size 16 --batch-size 256 \
      --ratio-range 0.5 0.9 --device cuda --steps 12 --variants fused_bank mae_random --saliency-refresh 0.25 \
      --json > "$OUT/bench_step_bank025.json" 2>> "$OUT/bench_step.log"
  [ $? -eq 0 ] && cat "$OUT/bench_step_bank025.json" || { tail -20 "$OUT/bench_step.log"; status=1; }
fi

step "CUDA tests (pytest -m cuda)"
# Every failure is reported (no -x): one device call has to show them all. xdist/pytest-timeout are in
# the GPU image; used only where importable.
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
TMO=""; $PY -c "import pytest_timeout" 2>/dev/null && TMO="--timeout 240"
timeout 300 $PY -m pytest -q -m cuda tests $XDIST $TMO -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
    > "$OUT/cuda_tests.txt" 2>&1
[ $? -eq 0 ] || status=1
tail -30 "$OUT/cuda_tests.txt"

step "copy bandwidth + operator benchmarks"
# --step-steps 0: the step benchmark ran above with all four variants and the full report.
timeout 150 $PY -m amgsn bench --device cuda --json "$OUT/bench_ops.json" --rounds 50 --step-steps 0 2>&1 | tee "$OUT/bench_ops.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Issue 24 (docs/method.md §9.3): the step compiled (regional torch.compile, T dynamic) against the eager
# step in the same round-robin. Targets: fused_compiled_speedup >= 1.3 and fused_compiled's mfu >= 0.35;
# fused_bank_over_mae_random_compiled is ABMG's price (saliency bank at its default P) when compiled.
# Cold Inductor cache on a fresh machine: compile_s per *_compiled entry is the cold compile time.
step "compiled training step: ViT-B/16, 224 px, batch 256, bf16, --compile vs eager (fused, fused_bank, mae_random)"
timeout 180 $PY -m amgsn bench-step --model vit_base --img-size 224 --patch-size 16 --batch-size 256 \
    --ratio-range 0.5 0.9 --device cuda --steps 8 --variants fused fused_bank mae_random --compile --json \
    > "$OUT/bench_step_compile.json" 2> "$OUT/bench_step_compile.log"
if [ $? -eq 0 ]; then
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); c = r['fused_compiled']
print('compiled / eager fused: %.3fx (target 1.3), MFU %s (target 0.35), fused_bank / mae_random compiled: %s, '
      'compile %s s, recompiles %s' % (r['fused_compiled_speedup'], c.get('mfu'),
      r.get('fused_bank_over_mae_random_compiled'), c['compile_s'], c['recompiles']))" "$OUT/bench_step_compile.json"
else
  tail -20 "$OUT/bench_step_compile.log"; status=1
fi

step "memory floors: each launch's measured time beside its DRAM floor (docs/method.md §9.2)"
timeout 90 $PY benchmarks/memory_floors.py --device cuda --json "$OUT/floors.json" 2>&1 | tee "$OUT/floors.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck: the CUDA masking kernels at odd sizes (no caching allocator)"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SANITIZER" --tool memcheck --error-exitcode 99 \
      $PY -m pytest -q -m cuda tests/test_cuda_odd_shapes.py -p no:cacheprovider > "$OUT/memcheck.txt" 2>&1
  rc=$?; tail -5 "$OUT/memcheck.txt"; [ $rc -eq 0 ] || { echo "memcheck exit $rc"; status=1; }
else
  echo "compute-sanitizer not found on this machine: memcheck not run" | tee "$OUT/memcheck.txt"
fi

step "amgsn kernels: registers, spills, occupancy (Triton here + this GPU's arch)"
timeout 150 $PY -m amgsn kernels --jobs 8 --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1 || status=1
grep -E "^(_select|_rank|_head)|amgsn kernels:" "$OUT/kernels.txt" | cut -c1-160

if [ "${PROFILE:-1}" != 0 ]; then  # PROFILE=0 leaves ~2 minutes of device time for gpu_experiment.sh
  step "where the step's time goes (benchmarks/profile_step.py)"
  timeout 240 $PY benchmarks/profile_step.py --out "$OUT/profile" > "$OUT/profile.log" 2>&1 || status=1
  grep -E "^(fused|reference|mae_random|trials) " "$OUT/profile.log" | cut -c1-300
fi

step "summary"
cat "$OUT/env.txt"; grep -E "passed|failed|error" "$OUT/cuda_tests.txt" | tail -3
[ -s "$OUT/bench_step.json" ] && cat "$OUT/bench_step.json"; tail -15 "$OUT/bench_ops.txt"
exit $status
