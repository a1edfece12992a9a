#!/usr/bin/env bash
# Quiet-machine reruns after the sixth session's changes (no other job of ours running; uptime
# logged before each). Same commands as ../cpu-xeon-2core-2026-12-06-evening/run.sh for what this
# session touched, plus one thread for the tutorial and --same-rows for the hash tables.
set -u
B=${B:-jaggedrec-bench}
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S) $(uptime)" >> load.log; "$B" "$@" --no-progress --output $name.json > $name.txt 2>&1; }
T="--preset dlrm --mode train --providers jaggedrec[torch],fbgemm"
run tutorial-fwd-threads1 --preset tutorial --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --threads 1 --repeats 15
run tutorial-fwd-threads2 --preset tutorial --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --threads 2 --repeats 15
run tutorial-train-threads1 --preset tutorial --mode train --providers 'eb_loop,jaggedrec[torch],torchrec,fbgemm' --threads 1 --repeats 15
run tutorial-train-threads2 --preset tutorial --mode train --providers 'eb_loop,jaggedrec[torch],torchrec,fbgemm' --threads 2 --repeats 15
run mc --module mc --repeats 15 --same-rows
run train-l1-sgd-threads1 $T --threads 1 --repeats 15
run train-l1-sgd-threads2 $T --threads 2 --repeats 15
run train-l20-adagrad $T --pooling-factor 20 --optimizer exact_adagrad --threads 1 --repeats 9
run dlrm-fwd-threads1 --preset dlrm --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --threads 1 --repeats 15
echo "== done $(date -u +%H:%M:%S) $(uptime)" >> load.log
