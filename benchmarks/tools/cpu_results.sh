#!/usr/bin/env bash
# Reproduce the CPU results the README shows: dlrm (forward, backward, train), pooling and
# scaling (forward), each as JSON, CSV, PNG and the printed table, into one folder; and the
# unpooled EmbeddingCollection (--module ec: forward, backward and train in one run each) at the
# pooling preset's tables with 20 ids per feature, and at the mixed-dims preset.
#
#     bash benchmarks/tools/cpu_results.sh benchmarks/results/cpu-<machine>-<date>
#     ONLY=ec bash benchmarks/tools/cpu_results.sh DIR     # just the EmbeddingCollection's runs (ONLY=ebc: the others)
#
# THREADS sets torch's CPU threads (default 1). On a shared 2-core machine, two OpenMP threads
# stall at every parallel region whenever a neighbour holds a core (a 6 ms step becomes 400 ms),
# so one thread gives numbers that mean something; on an idle machine, THREADS=0 uses torch's
# default. The JSON records the threads and the load average at each start.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${1:?usage: bash benchmarks/tools/cpu_results.sh OUTPUT_DIR}"
BENCH="${BENCH:-jaggedrec-bench}"
THREADS="${THREADS:-1}"
mkdir -p "$DIR"
run() {  # run NAME ARGS...
    local name="$1"; shift
    local threads=(--threads "$THREADS")  # 0: torch's default, one per core
    echo "== $name: $BENCH --device cpu $* ${threads[*]} --repeats 20" >&2
    rm -f "$DIR/$name.csv"  # --csv appends; start each file afresh
    $BENCH --device cpu "$@" "${threads[@]}" --repeats 20 --no-progress \
        --output "$DIR/$name.json" --csv "$DIR/$name.csv" --plot "$DIR/$name.png" | tee "$DIR/$name.txt"
}
if [[ "${ONLY:-}" != ec ]]; then
    run dlrm-forward --preset dlrm --mode forward
    run dlrm-backward --preset dlrm --mode backward
    run dlrm-train --preset dlrm --mode train
    run pooling-forward --preset pooling --mode forward
    run scaling-forward --preset scaling --mode forward
fi
if [[ "${ONLY:-}" != ebc ]]; then
    run ec-pooling20 --module ec --preset pooling --pooling-factor 20
    run ec-mixed-dims --module ec --preset mixed-dims
fi
