#!/usr/bin/env bash
# Quiet-machine reruns after the fifth session's changes (no other job of ours running; uptime
# logged before each). The commands are those of ../cpu-xeon-2core-2026-12-06-quiet-after/run.sh
# for the figures this session's work touched.
set -u
B=${B:-jaggedrec-bench}
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S) $(uptime)" >> load.log; "$B" "$@" --no-progress --output $name.json > $name.txt 2>&1; }
T="--preset dlrm --mode train --providers jaggedrec[torch],fbgemm"
run quant-tutorial --preset tutorial --mode forward --dtype int8,int4 --threads 1 --repeats 15
run quant-dlrm-20 --preset dlrm --pooling-factor 20 --mode forward --dtype int8,int4 --threads 1 --repeats 9
run quant-dlrm --preset dlrm --mode forward --dtype int8,int4 --threads 1 --repeats 15
run train-l1-sgd-threads1 $T --threads 1 --repeats 15
run train-l1-sgd-threads2 $T --threads 2 --repeats 15
run train-l20-sgd-threads1 --preset dlrm --mode train --pooling-factor 20 --providers 'eb_loop,jaggedrec[torch],fbgemm' --threads 1 --repeats 15
run train-l20-adagrad $T --pooling-factor 20 --optimizer exact_adagrad --threads 1 --repeats 9
run train-l1-adagrad $T --optimizer exact_adagrad --threads 1 --repeats 15
run fpebc-forward-1thread --module fpebc --preset pooling --mode forward --threads 1 --repeats 30
run mc --module mc --repeats 15
# small batches beside one busy process: the tutorial's forward and train step, two threads
run tutorial-fwd-busy --preset tutorial --mode forward --providers 'eb_loop,jaggedrec[torch],torchrec' --busy 0,1 --threads 2 --repeats 15
run tutorial-train-busy --preset tutorial --mode train --providers 'eb_loop,jaggedrec[torch],torchrec,fbgemm' --busy 0,1 --threads 2 --repeats 15
echo "== done $(date -u +%H:%M:%S) $(uptime)" >> load.log
