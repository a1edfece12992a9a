#!/bin/bash
# Before/after of the small-batch work, alternating: "before" is the tree at 9bf135c (a copy of its
# jaggedrec/ at $BASE, put first on PYTHONPATH; the benchmarks are the work tree's), "after" the work tree.
# Run from a directory other than the repository root, so that the work tree's jaggedrec is not
# found first through the current directory. B: the jaggedrec-bench executable.
B=${B:-/work/main/.venv/bin/jaggedrec-bench}
BASE=${BASE:-/tmp/T/base}
for threads in 2 1; do
  for mode in forward train; do
    providers='eb_loop,jaggedrec[torch],torchrec'
    [ "$mode" = train ] && providers='eb_loop,jaggedrec[torch],torchrec,fbgemm'
    for side in before after; do
      echo "=== tutorial $mode, $threads threads, $side ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
      if [ "$side" = before ]; then export PYTHONPATH=$BASE; else unset PYTHONPATH; fi
      $B --preset tutorial --mode $mode --providers "$providers" --threads $threads --repeats 15 --no-progress 2>&1 \
        | grep -E "^(eb_loop|jaggedrec|torchrec|fbgemm)"
    done
  done
done
