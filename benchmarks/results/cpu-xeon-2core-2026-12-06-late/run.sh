#!/usr/bin/env bash
# Quiet-machine reruns at the end of the seventh session (no other job of ours running; uptime
# logged before each): the tutorial, the hash tables, the dlrm forward, the FPEBC forward, and
# the fused step against FBGEMM's CPU TBE for each EmbOptimType FBGEMM steps on CPU (exact SGD,
# exact row-wise Adagrad, exact Adagrad) at 1 and 20 ids per bag, 1 and 2 threads.
#   cd benchmarks/results/cpu-xeon-2core-2026-12-06-late && B=../../../.venv/bin/jaggedrec-bench ./run.sh
set -u
B=${B:-jaggedrec-bench}
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S) $(uptime)" >> load.log; "$B" "$@" --no-progress --output $name.json > $name.txt 2>&1; }
for t in 1 2; do
  run tutorial-fwd-threads$t --preset tutorial --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --threads $t --repeats 15
  run tutorial-train-threads$t --preset tutorial --mode train --providers 'eb_loop,jaggedrec[torch],torchrec,fbgemm' --threads $t --repeats 15
done
run mc --module mc --repeats 15 --same-rows
for opt in exact_sgd exact_rowwise_adagrad exact_adagrad; do
  for t in 1 2; do
    run train-l1-$opt-threads$t --preset dlrm --mode train --providers 'jaggedrec[torch],fbgemm' --optimizer $opt --threads $t --repeats 15
    run train-l20-$opt-threads$t --preset dlrm --mode train --providers 'jaggedrec[torch],fbgemm' --optimizer $opt --pooling-factor 20 --threads $t --repeats 7
  done
done
run dlrm-fwd-threads1 --preset dlrm --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --threads 1 --repeats 15
run fpebc-fwd-threads1 --module fpebc --preset pooling --mode forward --threads 1 --repeats 15
echo "== done $(date -u +%H:%M:%S) $(uptime)" >> load.log
