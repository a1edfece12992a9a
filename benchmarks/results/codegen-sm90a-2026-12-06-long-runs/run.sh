cd /work/main
OUT=${OUT:-.}
W='[["--dtype","fp32","--dim","128","--ids","int64","--kernels","long_runs"],["--dtype","fp16","--dim","64","--ids","int32","--batch-size","1000","--kernels","long_runs"],["--dtype","bf16","--dim","128","--ids","int64","--weighted","--kernels","long_runs"],["--legacy-loops","--kernels","long_runs"]]'
for py in .venv/bin/python /work/venv211/bin/python; do
  TRITON_INTERPRET=0 timeout 600 $py benchmarks/tools/codegen_report.py --workloads "$W" --processes 1 --json $OUT/readings-$(basename $(dirname $(dirname $py))).json
  $py -c "
import json,sys; d=json.load(open(sys.argv[1]))
for w, rs in d.items():
    for r in rs: print(w[:40], r['label'], 'regs', r['registers'], 'stack', r['stack_bytes'], 'spills', r['loop_spills'], r['outer_loop_spills'], 'trips', r['round_trips'], 'ld', r['row_load_bytes'], 'occ', r['occupancy'])
" $OUT/readings-$(basename $(dirname $(dirname $py))).json
done
