cd /work/main
OUT=${OUT:-.}
K=${K:-fwd,quant_fwd}
W='[["--dtype","fp32","--dim","128","--ids","int64","--kernels","'$K'"],["--dtype","fp16","--dim","64","--ids","int32","--batch-size","1000","--kernels","'$K'"],["--dtype","bf16","--dim","128","--ids","int64","--weighted","--kernels","'$K'"]]'
for py in .venv/bin/python /work/venv211/bin/python; do
  j=$OUT/readings-$K-$($py -c "import triton;print(triton.__version__)").json
  TRITON_INTERPRET=0 timeout 600 $py benchmarks/tools/codegen_report.py --workloads "$W" --processes 1 --json $j
  $py -c "
import json,sys; d=json.load(open(sys.argv[1]))
for w, rs in d.items():
    for r in rs: print(w[:36], r['label'], 'regs', r['registers'], 'stack', r['stack_bytes'], 'spills', r['loop_spills'], r['outer_loop_spills'], 'trips', r['round_trips'], 'x', r['steps_per_iteration'], 'ld', r['row_load_bytes'], 'occ', r['occupancy'], 'pro', r['prologue_round_trips'])
" $j
done
