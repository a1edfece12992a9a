#!/usr/bin/env bash
# Fifth session, helper S: the fused CPU step beside FBGEMM's TBE after the split and the
# write-back / sort changes. LOADED machine (other helpers' tests running; uptime in load.log).
set -u
B=${B:-jaggedrec-bench}
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S) $(uptime)" >> load.log; "$B" "$@" --no-progress --output $name.json > $name.txt 2>&1; }
T="--preset dlrm --mode train --providers jaggedrec[torch],fbgemm"
run train-l20-adagrad $T --pooling-factor 20 --optimizer exact_adagrad --threads 1 --repeats 9
run train-l1-sgd-threads1 $T --threads 1 --repeats 15
run train-l1-sgd-threads2 $T --threads 2 --repeats 15
run train-l1-adagrad $T --optimizer exact_adagrad --threads 1 --repeats 15
echo "== done $(date -u +%H:%M:%S) $(uptime)" >> load.log
