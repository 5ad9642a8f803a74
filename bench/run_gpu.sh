#!/usr/bin/env bash
# The GPU validation, in stages, as run on the H100 for bench/results/ (stages combine into 10-minute slots):
#   bash bench/run_gpu.sh tests OUT      # GPU test suite, model and hook tests on CUDA, compute-sanitizer memcheck
#   bash bench/run_gpu.sh tune OUT       # tuning sweep: writes mmmerge_triton/configs/<device>.json (copied to OUT)
#   bash bench/run_gpu.sh evaluate OUT   # path="auto" against every path on the held-out grid (regret table)
#   bash bench/run_gpu.sh bench OUT      # the full benchmark grid (JSON, PNG)
#   bash bench/run_gpu.sh suites OUT     # items / plan / deepstack suites
#   bash bench/run_gpu.sh host OUT       # host cost per stage, loop time, idle-GPU time, held-out auto (bench/host_path.py)
#   bash bench/run_gpu.sh matters OUT    # headroom, stalls, deepstack, share of a step (bench/matters/)
#   bash bench/run_gpu.sh twogpu OUT     # the 2-GPU tests and the stress run over both GPUs (needs 2 GPUs)
#   bash bench/run_gpu.sh positions OUT  # row positions and modalities against index_copy_/index_put_/per-modality calls
#   bash bench/run_gpu.sh scan OUT       # the one-launch device-mask scan against a copy and the shipped kernels (--quick)
#   bash bench/run_gpu.sh untuned OUT    # path="auto" with the tuned table hidden, on the held-out grid
#   bash bench/run_gpu.sh chained OUT    # the transformers switch on an omni model's K merges, chained or not
#   bash bench/run_gpu.sh profile OUT    # a device mask's two launches split into kernels by the profiler
#   bash bench/run_gpu.sh prefix OUT     # the prefix count by bytes or words, in the scan and the one-launch kind
#   bash bench/run_gpu.sh overlap OUT    # a device mask's two launches, overlapped or one after the other
#   bash bench/run_gpu.sh counted OUT    # the row-map scan in two levels against one launch, alone and in the merge
#   bash bench/run_gpu.sh floor OUT      # the row copy alone against a copy: scattered or contiguous rows, per configuration
#   bash bench/run_gpu.sh select OUT     # a device mask's merge with no row map against the map route and a copy
#   bash bench/run_gpu.sh compare OUT    # loop and idle time against an earlier package in BEFORE (default .before;
#                                        # make it with: git archive REV mmmerge_triton kernels | tar -x -C .before)
# The real-engine hook tests need the engines' Python files: bench/engines/make_engine_env.sh bundle, then carry
# .engine_bundle and run bash .engine_bundle/run_tests.sh.
# Install first: pip install -e . (offline: python -m pip install --no-deps --no-build-isolation -e .).
set -uo pipefail
out=${2:-bench/results/run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The commit of the code measured, which every result file records (environment.commit; the tools read
# MMMERGE_COMMIT, mmmerge_triton/tools/bench.py code_commit): HEAD in a checkout whose tracked files match it;
# else the COMMIT file that travels with a copied tree (whose git HEAD, if any, is older than its files); else
# unset, and the tools write HEAD-dirty. A MMMERGE_COMMIT set by the caller wins.
if [ -z "${MMMERGE_COMMIT:-}" ]; then
  if [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$(pwd -P)" ] \
      && [ -z "$(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    MMMERGE_COMMIT=$(git rev-parse --short HEAD)
  elif [ -f COMMIT ]; then
    MMMERGE_COMMIT=$(tr -d '[:space:]' < COMMIT)
  fi
fi
if [ -n "${MMMERGE_COMMIT:-}" ]; then
  export MMMERGE_COMMIT
fi
echo "commit: ${MMMERGE_COMMIT:-not set (no clean checkout, no COMMIT file): the tools record git HEAD-dirty, or null}" \
  | tee "$out/commit.txt"
for stage in ${1//,/ }; do
  python -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, torch.version.cuda, triton.__version__)" \
    > "$out/environment.txt"
  case $stage in
    tests)
      # What else holds the GPU (a run cut before may leave its processes); then three pytest processes and
      # compute-sanitizer at once (under 4 minutes on an H100; the GPU idles between one process's small
      # cases): A the exactness sweep, B threads, launches, graphs, positions, scans, compile, C the rest. Each
      # failure written as it happens (tests/conftest.py), every thread's stack where a test runs past 5 minutes.
      nvidia-smi > "$out/nvidia_smi.txt" 2>&1
      shard() {  # name, pytest arguments
        MMMERGE_FAILURES="$out/gpu_failures_$1.log" python -m pytest "${@:2}" -q -rs -o faulthandler_timeout=300 \
          -p no:cacheprovider --junitxml="$out/gpu_junit_$1.xml" > "$out/gpu_tests_$1.log" 2>&1
        echo "tests $1: $(tail -n 1 "$out/gpu_tests_$1.log")"
      }
      a=(tests/gpu/test_exact.py)
      b=(tests/gpu/test_threads.py tests/gpu/test_launch.py tests/gpu/test_cuda_graph.py tests/gpu/test_positions.py
         tests/gpu/test_scan_copy.py tests/gpu/test_compile.py)
      shard A "${a[@]}" &
      shard B "${b[@]}" &
      shard C tests/gpu "${a[@]/#/--ignore=}" "${b[@]/#/--ignore=}" tests/models tests/test_engine_hooks.py \
        tests/test_requests.py tests/test_sglang_positions.py &
      (PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tests/gpu/sanitize.py > "$out/sanitize.log" 2>&1
       echo "compute-sanitizer exit code: $?" | tee -a "$out/sanitize.log") &
      wait
      ;;
    tune)
      python -m mmmerge_triton.tools.tune > "$out/tune.log" 2>&1
      tail -n 2 "$out/tune.log"
      cp mmmerge_triton/configs/*.json "$out/"
      ;;
    evaluate)
      python -m mmmerge_triton.tools.tune --evaluate --out "$out/regret.json" 2>&1 | tail -n 2
      ;;
    bench)
      python -m mmmerge_triton.tools.bench --out "$out" > "$out/bench.log" 2>&1
      sed -n '/^Targets/,$p' "$out/bench.log" | head -n 40   # targets, the copy's spread, notes below a copy
      ;;
    suites)
      python -m mmmerge_triton.tools.bench --suite all --out "$out" > "$out/suites.log" 2>&1
      tail -n 30 "$out/suites.log"
      ;;
    host)
      python bench/host_path.py --out "$out" > "$out/host_path.log" 2>&1
      tail -n 4 "$out/host_path.log"
      ;;
    matters)
      bash bench/matters/run.sh "$out/matters" > "$out/matters.log" 2>&1
      tail -n 3 "$out/matters.log"
      ;;
    positions)
      python bench/positions_bench.py --out "$out" --seconds 150 > "$out/positions.log" 2>&1
      tail -n 3 "$out/positions.log"
      ;;
    scan)
      python bench/scan_copy_bench.py --out "$out" --quick > "$out/scan_copy_quick.log" 2>&1
      tail -n 3 "$out/scan_copy_quick.log"
      ;;
    untuned)
      python bench/untuned.py --out "$out" > "$out/untuned.log" 2>&1
      tail -n 12 "$out/untuned.log"
      ;;
    chained)
      python bench/chained_merges.py --out "$out" > "$out/chained_merges.log" 2>&1
      tail -n 13 "$out/chained_merges.log"
      ;;
    profile)
      python bench/device_mask_profile.py --out "$out" > "$out/device_mask_profile.log" 2>&1
      tail -n 19 "$out/device_mask_profile.log"
      ;;
    prefix)
      python bench/prefix_count_bench.py --out "$out" > "$out/prefix_count.log" 2>&1
      tail -n 20 "$out/prefix_count.log"
      ;;
    overlap)
      python bench/device_mask_overlap.py --out "$out" > "$out/device_mask_overlap.log" 2>&1
      grep "^N=" "$out/device_mask_overlap.log"
      ;;
    counted)
      python bench/counted_scan.py --out "$out" > "$out/counted_scan.log" 2>&1
      grep -E "^(scan|merge) N=" "$out/counted_scan.log"
      ;;
    floor)
      python bench/row_copy_floor.py --out "$out" > "$out/row_copy_floor.log" 2>&1
      grep "^N=" "$out/row_copy_floor.log"
      ;;
    select)
      python bench/select_copy.py --out "$out" > "$out/select_copy.log" 2>&1
      grep -E "^N=|points from" "$out/select_copy.log"
      ;;
    compare)
      # 6 rounds: about 90 s on an H100 (2026-12-06-s6/compare_host_path.log)
      python bench/compare_host_path.py --before "${BEFORE:-.before}" --out "$out" --rounds 6 > "$out/compare_host_path.log" 2>&1
      tail -n 40 "$out/compare_host_path.log"
      ;;
    twogpu)
      python -m pytest tests/gpu/test_threads.py tests/gpu/test_streams.py tests/gpu/test_tensor_parallel.py -q -rs \
        -p no:cacheprovider > "$out/gpu_2gpu_tests.log" 2>&1
      tail -n 3 "$out/gpu_2gpu_tests.log"
      python tests/gpu/stress.py --devices 2 --seconds 40 > "$out/stress_2gpu.log" 2>&1
      tail -n 2 "$out/stress_2gpu.log"
      ;;
  esac
done
