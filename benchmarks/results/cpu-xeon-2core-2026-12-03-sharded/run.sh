#!/usr/bin/env bash
# The runs of this folder: the dlrm preset on 2 gloo ranks, one torch thread per rank, every
# --sharding, forward and train, each as JSON and the printed table. BENCH defaults to the
# console script; these files came from BENCH="python -P -m jaggedrec.benchmarks" with the
# worktree's package on PYTHONPATH (the same entry point).
set -euo pipefail
cd "$(dirname "$0")"
BENCH="${BENCH:-jaggedrec-bench}"
for mode in forward train; do
    for sharding in table_wise column_wise row_wise data_parallel auto; do
        echo "== $sharding-$mode: $BENCH --world-size 2 --sharding $sharding --preset dlrm --mode $mode --device cpu --threads 1 --repeats 10 --no-progress --output $sharding-$mode.json" >&2
        $BENCH --world-size 2 --sharding "$sharding" --preset dlrm --mode "$mode" --device cpu --threads 1 \
            --repeats 10 --no-progress --output "$sharding-$mode.json" | tee "$sharding-$mode.txt"
    done
done
