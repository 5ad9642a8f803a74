#!/usr/bin/env bash
# "When it matters" (issue 16): the four benchmarks of bench/matters/ on a GPU, one JSON each into OUT, every
# script's output in OUT/run.log, then the README tables (OUT/summary.md), printed last.
#   bash bench/matters/run.sh OUT            # H100: about 4 minutes, never more than MATTERS_BUDGET_S (285)
#   bash bench/matters/run.sh OUT --smoke    # CPU, tiny sizes: proves the scripts run
# Each script is stopped at its share of the budget (its JSON keeps what it measured by then); step_share runs
# last and starts a torch.compile only if it can finish before MATTERS_DEADLINE.
set -uo pipefail
out=${1:?usage: bash bench/matters/run.sh OUT [--smoke]}
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget=${MATTERS_BUDGET_S:-285}
start=$(date +%s)
export MATTERS_DEADLINE=$((start + budget - 5))
: > "$out/run.log"

# The scripts import the installed package: install this checkout unless it is the one installed (offline-safe).
installed="import sys, pathlib, mmmerge_triton as m; sys.exit(not pathlib.Path(m.__file__).resolve().is_relative_to('$root'))"
if ! python -c "$installed" 2>/dev/null; then
  echo "== installing $root (pip install --no-deps --no-build-isolation -e .)" | tee -a "$out/run.log"
  python -m pip install --no-deps --no-build-isolation -q -e "$root" >> "$out/run.log" 2>&1
fi

run() {  # script, its cap in seconds, arguments
  local name=$1 cap=$2
  shift 2
  local left=$((MATTERS_DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then echo "== $name: skipped, the budget is spent" | tee -a "$out/run.log"; return; fi
  local t0=$(date +%s)
  echo "== $name (at most $limit s)" | tee -a "$out/run.log"
  timeout "$limit" python "$here/$name.py" --out "$out" "$@" >> "$out/run.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $(($(date +%s) - t0)) s$( ((rc == 124)) && echo ' (stopped at its cap)')" \
    | tee -a "$out/run.log"
}

run headroom 80 "$@"
run stalls 40 "$@"
run deepstack 35 "$@"
run step_share 600 "$@"   # the rest of the budget
echo "== total $(($(date +%s) - start)) s" | tee -a "$out/run.log"
python "$here/summary.py" "$out" > "$out/summary.md"
cat "$out/summary.md"
