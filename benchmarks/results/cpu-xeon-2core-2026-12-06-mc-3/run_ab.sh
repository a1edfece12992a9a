#!/bin/sh
# jaggedrec-bench --module mc, alternating processes: "old" = the library of commit $1 (a detached
# worktree at $2, put first on PYTHONPATH; the benchmark code, benchmarks/providers/mc.py, is
# main's for both), "new" = the library of main's tree. Usage: sh run_ab.sh BASE WORKTREE OUTDIR ["RUNS"]
set -e
base=$1; wt=$2; out=$3
mkdir -p "$out"
for run in ${4:-1 2}; do
  for side in old new; do
    echo "$side $run start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/ab.log"
    if [ "$side" = old ]; then
      PYTHONPATH="$wt" /work/main/.venv/bin/jaggedrec-bench --module mc --repeats 15 --no-progress --same-rows \
        --output "$out/mc-$side-$run.json" > "$out/mc-$side-$run.txt"
    else
      /work/main/.venv/bin/jaggedrec-bench --module mc --repeats 15 --no-progress --same-rows \
        --output "$out/mc-$side-$run.json" > "$out/mc-$side-$run.txt"
    fi
    echo "$side $run end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/ab.log"
  done
done
