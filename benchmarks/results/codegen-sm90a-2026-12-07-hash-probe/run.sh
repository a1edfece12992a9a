#!/usr/bin/env bash
# The readings of this folder, from the repository root (CPU only: builds for sm_90a, no GPU).
# BEFORE: the kernel file before the pipeline (git show fe79b0f~1:kernels/hash_probe.py > before.py).
set -euo pipefail
R=benchmarks/results/codegen-sm90a-2026-12-07-hash-probe
BEFORE=${BEFORE:-/tmp/hash_probe_before.py}
[[ -f $BEFORE ]] || git show fe79b0f~1:kernels/hash_probe.py > "$BEFORE"
for py in .venv/bin/python /work/venv211/bin/python; do
    t=$($py -c 'import triton; print("triton" + "".join(triton.__version__.split(".")[:2]))')
    # every variant the library can launch (buckets, dims, id types), before and after
    OLD=$BEFORE TRITON_INTERPRET=0 $py $R/read_variants.py $R/$t-variants-before.json > $R/$t-variants-before.txt
    TRITON_INTERPRET=0 $py $R/read_variants.py $R/$t-variants-after.json > $R/$t-variants-after.txt
    # the report's own workload (and one of 64-wide rows, int32 ids), with its Little's-law estimates
    TRITON_INTERPRET=0 $py benchmarks/tools/codegen_report.py --kernels hash_probe --estimate \
        --json $R/$t-fp32-dim128-int64.json > $R/$t-fp32-dim128-int64.txt
    TRITON_INTERPRET=0 $py $R/report_before.py "$BEFORE" --kernels hash_probe --estimate \
        --json $R/$t-fp32-dim128-int64-before.json > $R/$t-fp32-dim128-int64-before.txt
    TRITON_INTERPRET=0 $py benchmarks/tools/codegen_report.py --kernels hash_probe --estimate --dim 64 --ids int32 \
        --json $R/$t-fp32-dim64-int32.json > $R/$t-fp32-dim64-int32.txt
    TRITON_INTERPRET=0 $py $R/report_before.py "$BEFORE" --kernels hash_probe --estimate --dim 64 --ids int32 \
        --json $R/$t-fp32-dim64-int32-before.json > $R/$t-fp32-dim64-int32-before.txt
done
