#!/usr/bin/env bash
# The one prepared GPU check: install offline, run the GPU test lane, run the benchmark
# presets that matter, and leave JSON, CSV, PNG and a log under $OUT. Finishes in under
# 8 minutes: every step runs under `timeout`, and steps are skipped once the total budget
# is spent. Run it from the repository root:
#
#     bash benchmarks/tools/gpu_check.sh           # OUT defaults to ./out
#
# The device has Python 3.12, torch and triton preinstalled and no network, hence
# `pip install --no-deps --no-build-isolation`. A failing step is logged and the script
# goes on; the exit status is that of the first failing step (0 when all passed).
#
# For a dry run on a machine without a GPU (no numbers from it are GPU numbers):
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP_INSTALL=1 \
#     GPU_CHECK_EXTRA_ARGS="--num-embeddings 1000 --batch-size 64 --repeats 3" bash benchmarks/tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA_ARGS:-}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"   # 7.5 min for all steps together
DEADLINE=$((SECONDS + BUDGET_S))
STATUS=0
exec > >(tee -a "$LOG") 2>&1

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

# step NAME LIMIT_S CMD...: run CMD under a timeout of min(LIMIT_S, time left); never abort the script.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$((DEADLINE - SECONDS))
    if (( left < 15 )); then
        log "SKIP $name: the ${BUDGET_S}s budget is spent"
        return 0
    fi
    (( limit > left )) && limit=$left
    log "START $name (limit ${limit}s): $*"
    local rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if (( rc == 0 )); then
        log "OK $name"
    elif (( rc == 124 || rc == 137 )); then
        log "TIMEOUT $name after ${limit}s"
    else
        log "FAIL $name (exit $rc)"
    fi
    if (( rc != 0 && STATUS == 0 )); then STATUS=$rc; fi
    return 0
}

log "OUT=$OUT device=$DEVICE python=$($PY -c 'import sys; print(sys.version.split()[0])')"
if [[ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then
    step install 120 $PY -m pip install -q --no-deps --no-build-isolation -e .
fi
if ! $PY -c 'import jaggedrec.benchmarks, jaggedrec.kernels' 2>/dev/null; then
    # No usable install (e.g. a setuptools too old for editable installs): lay out the package
    # as pyproject's package-dir does, with links, and put it on PYTHONPATH.
    SHADOW="$(mktemp -d)"
    mkdir -p "$SHADOW/jaggedrec"
    for f in "$PWD"/jaggedrec/*; do ln -s "$f" "$SHADOW/jaggedrec/"; done
    ln -s "$PWD/kernels" "$SHADOW/jaggedrec/kernels"
    ln -s "$PWD/benchmarks" "$SHADOW/jaggedrec/benchmarks"
    export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
    log "jaggedrec not installed; importing it from links under $SHADOW"
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' || true
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv || true
fi

# The GPU test lane: tests marked `gpu` (realistic sizes, opcheck, torch.compile on CUDA) and the
# kernel tests, which run on CUDA when it is there; -rP prints the compiled-vs-eager timing.
# pytest exits 5 when none are collected; that is not a failure.
if $PY -c 'import pytest' 2>/dev/null; then
    gpu_tests() {
        JAGGEDREC_AUTOTUNE=0 $PY -m pytest -q -rP -p no:cacheprovider -m "gpu or interpret" tests
        local rc=$?; (( rc == 5 )) && return 0; return $rc
    }
    export -f gpu_tests
    export PY
    step gpu-tests 100 bash -c gpu_tests
else
    log "SKIP gpu-tests: pytest is not installed here"
fi

bench() {  # bench NAME LIMIT_S ARGS...: one benchmark run, its files named after NAME
    local name="$1" limit="$2"; shift 2
    step "bench-$name" "$limit" $PY -m jaggedrec.benchmarks --device "$DEVICE" --no-progress "$@" "${EXTRA[@]}" \
        --output "$OUT/$name.json" --csv "$OUT/$name.csv" --plot "$OUT/$name.png"
}
# Most important first (the steps past the 450 s budget are skipped, the log says which).
# torch.compile gets its own last step: a slow compile then costs only
# that step (a run cut off by its timeout keeps the configurations it finished, in its JSON).
NO_COMPILE="eb_loop,eb_concat,jaggedrec[torch],jaggedrec[triton],torchrec_ebc,fbgemm_tbe"
# The short-bag forward (kernels/pooled_fwd_short.py, persistent and pipelined across blocks) against the
# general forward kernel on the same seeded inputs (JAGGEDREC_SHORT_BAGS=0), alternated twice, at the dlrm
# preset's one id per bag and at 2 ids per bag; the first answer to whether its machine-code estimate holds
for round in 1 2; do
    for short in 0 1; do
        for pf in 1 2; do
            JAGGEDREC_SHORT_BAGS=$short bench "short$short-forward-L$pf-$round" 15 --preset dlrm --mode forward \
                --pooling-factor "$pf" --providers "jaggedrec[triton]"
        done
    done
done
# The hash tables' probe-and-gather kernel (kernels/hash_probe.py) against the static gather on the same ids and
# rows (the same kernel with the tables marked static, and the pooled forward on the rows the probe finds): the
# dlrm shape, 26 hashed tables of 500,000 slots, one id per bag, then 20; ~10 s each on an H100
HASH_SMALL=()
[[ "$DEVICE" == cpu ]] && HASH_SMALL=(--features 2 --batch-size 16 --rows 256 --repeats 1 --rounds 1)
for pf in 1 20; do
    step "hash-probe-L$pf" 30 $PY benchmarks/tools/hash_probe_timing.py --device "$DEVICE" --ids-per-bag "$pf" \
        "${HASH_SMALL[@]}" --output "$OUT/hash-probe-L$pf.json"
done
# Pipelined loops against the loops they replaced (JAGGEDREC_LEGACY_LOOPS=1), on the same seeded
# inputs, alternated twice, for the forward, the backward and a train step at the dlrm preset
for round in 1 2; do
    for legacy in 1 0; do
        for mode in forward train; do
            JAGGEDREC_LEGACY_LOOPS=$legacy bench "loops-legacy$legacy-$mode-$round" 20 --preset dlrm --mode "$mode" \
                --providers "jaggedrec[triton]"
        done
    done
done
# every autotune config's time, forward, backward and each fused step, both loops
step autotune-times 60 $PY benchmarks/tools/autotune_times.py --output "$OUT/autotune_times.json"
bench dlrm-forward 45 --preset dlrm --mode forward --providers "$NO_COMPILE"
bench dlrm-backward 40 --preset dlrm --mode backward --providers "$NO_COMPILE"
bench dlrm-train 40 --preset dlrm --mode train --providers "$NO_COMPILE"
# quantized tables (INT8, INT4 rows dequantized in the one forward launch) against the fp32 module,
# both dtypes in one run per preset (a run cut off by its timeout keeps what it finished)
bench quant-dlrm 30 --preset dlrm --mode forward --dtype int8,int4 --repeats 15
bench quant-pooling 30 --preset pooling --mode forward --dtype int8,int4 --repeats 15
# the unpooled EmbeddingCollection (--module ec: the nn.Embedding loop as the baseline, TorchRec's EC and
# FBGEMM's PoolingMode.NONE where installed), forward, backward and train in one run: the pooling preset's
# tables, 8 of them, 20 ids per feature (~330k rows a step, 2 GB of tables per provider); about 20 s
bench ec 30 --module ec --preset pooling --tables 8 --pooling-factor 20 \
    --providers "embedding_loop,jaggedrec[triton],torchrec_ec,fbgemm_tbe_none,fbgemm_inference_none"
# the sharded benchmark on one rank over NCCL: jaggedrec's DistributedModelParallel (its planner's plan) and
# TorchRec's where it imports, checked against the unsharded reference, beside the unsharded module; a world of
# one sends nothing, so this checks the NCCL path and the CUDA timing of the collectives, not scaling
step sharded-nccl 60 $PY -m jaggedrec.benchmarks --world-size 1 --sharding auto --device "$DEVICE" --no-progress \
    --preset dlrm --mode train --timeout 55 "${EXTRA[@]}" --output "$OUT/sharded-w1-auto.json"
# the train pipelines on one GPU over NCCL with CUDA streams (the batch copy and the input distribution on side
# streams; batches start pinned on the host): jaggedrec's and TorchRec's (where it imports) beside the plain loop,
# without and with a 5 ms delay on every collective. A world of one sends nothing: this checks the streams, the
# NCCL path and the memory in flight, not the overlap of real transfers (that needs two GPUs)
step pipeline-nccl 90 $PY -m jaggedrec.benchmarks --world-size 1 --pipeline none,base,sparse_dist,semi_sync \
    --device "$DEVICE" --no-progress --comm-delay-ms 0,5 --timeout 85 "${EXTRA[@]}" \
    --output "$OUT/pipeline-w1.json" --csv "$OUT/pipeline-w1.csv"
# zipf ids: hot rows, whose long runs of ids the backward sums with a kernel of their own
bench dlrm-train-zipf 30 --preset dlrm --mode train --distribution zipf --pooling-factor 20 \
    --providers "eb_loop,jaggedrec[triton],fbgemm_tbe"
bench pooling-forward 45 --preset pooling --mode forward --providers "$NO_COMPILE"
bench scaling-forward 45 --preset scaling --mode forward --providers "$NO_COMPILE"
bench dlrm-forward-compiled 50 --preset dlrm --mode forward \
    --providers "eb_loop,eb_loop_compiled,jaggedrec[triton],jaggedrec_compiled"

log "summary (median ms, GB/s, speedup over the run's baseline: the nn.EmbeddingBag loop, nn.Embedding's for ec, the fp32 module for int8/int4; every number measured in this run):"
$PY - "$OUT" <<'EOF' || true
import glob, json, os, sys

rows = [("run", "config", "provider", "status", "median ms", "GB/s", "vs loop")]
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    doc = json.load(open(path))
    for run in doc.get("runs", []):
        c = run.get("config")
        if c is None:  # a layout of its own (another script's JSON)
            continue
        config = f"T={c['tables']} B={c['batch_size']} L={c['pooling_factor']:g} D={','.join(map(str, c['dims']))}"
        if doc.get("module"):  # --module ec: one file holds every mode (sharded: ratios to jaggedrec_1proc)
            config += f" {doc['module']} {c['mode']}"
        if c["dtype"] != "fp32":  # --dtype int8,int4: one file holds both
            config += f" {c['dtype']}"
        for name, r in run["providers"].items():
            ok = r["status"] == "ok"
            ratio = r.get("vs_1proc", r.get("speedup_vs_loop"))
            rows.append((os.path.basename(path)[:-5], config, name, r["status"],
                         f"{r['median_ms']:.3f}" if ok else "-", f"{r['gbps']:.1f}" if ok else "-",
                         f"{ratio:.2f}x" if ok and ratio is not None else "-"))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
EOF
log "done in ${SECONDS}s, exit status $STATUS; files in $OUT"
exit "$STATUS"
