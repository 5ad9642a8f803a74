#!/usr/bin/env bash
# The GPU validation, in stages, as run on the H100 for bench/results/ (each stage fits a 10-minute slot):
#   bash bench/run_gpu.sh tests OUT   # GPU test suite, model and hook tests on CUDA, compute-sanitizer memcheck
#   bash bench/run_gpu.sh tune OUT    # tuning sweep (writes the device's table), then the held-out regret check
#   bash bench/run_gpu.sh bench OUT   # the full benchmark grid, then the items / plan / deepstack suites
# OUT receives the logs and result files. Install first: pip install -e . (offline: --no-deps --no-build-isolation).
set -uo pipefail
stage=$1
out=${2:-bench/results/run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python - <<'PY' > "$out/environment_$stage.txt"
import platform, torch, triton
print(f"device: {torch.cuda.get_device_name()}\ntorch: {torch.__version__}\ncuda: {torch.version.cuda}")
print(f"triton: {triton.__version__}\npython: {platform.python_version()}")
PY
case $stage in
  tests)
    python -m pytest tests/gpu tests/models tests/test_engine_hooks.py -q -rs -p no:cacheprovider \
      --junitxml="$out/gpu_junit.xml" 2>&1 | tee "$out/gpu_tests.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python tests/gpu/sanitize.py > "$out/sanitize.log" 2>&1
    echo "compute-sanitizer exit code: $?" | tee -a "$out/sanitize.log"
    tail -n 5 "$out/sanitize.log"
    ;;
  tune)
    python -m mmmerge_triton.tune 2>&1 | tee "$out/tune.log"
    cp mmmerge_triton/configs/*.json "$out/"
    python -m mmmerge_triton.tune --evaluate --out "$out/regret.json" 2>&1 | tee "$out/evaluate.log"
    ;;
  bench)
    python -m mmmerge_triton.bench --out "$out" 2>&1 | tee "$out/bench.log"
    python -m mmmerge_triton.bench --suite all --out "$out" 2>&1 | tee "$out/suites.log"
    ;;
esac
