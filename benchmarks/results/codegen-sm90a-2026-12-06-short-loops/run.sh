#!/bin/bash
# usage: run.sh PYTHON OUT.json [kernels]   (repository root)
K=${3:-fwd_short,fwd_long_bags,quant_fwd_short}
WL="[[\"--dtype\",\"fp32\",\"--dim\",\"128\",\"--ids\",\"int64\",\"--kernels\",\"$K\"],
     [\"--dtype\",\"fp16\",\"--dim\",\"64\",\"--ids\",\"int32\",\"--batch-size\",\"1000\",\"--kernels\",\"$K\"],
     [\"--dtype\",\"bf16\",\"--dim\",\"128\",\"--ids\",\"int64\",\"--weighted\",\"--kernels\",\"$K\"]]"
TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 $1 benchmarks/tools/codegen_report.py --workloads "$WL" --processes 2 --json $2
