#!/usr/bin/env bash
# Quiet-machine reruns (no other job of ours running); uptime logged before each.
set -u
B=/work/main/.venv/bin/jaggedrec-bench
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S) $(uptime)" >> load.log; "$B" "$@" --no-progress --output $name.json > $name.txt 2>&1; }
run train-l20-threads2 --preset dlrm --mode train --pooling-factor 20 --providers 'eb_loop,jaggedrec[torch],fbgemm' --busy 0,1 --threads 2 --repeats 15
run quant-tutorial --preset tutorial --mode forward --dtype int8,int4 --threads 1 --repeats 15
run quant-dlrm-20 --preset dlrm --pooling-factor 20 --mode forward --dtype int8,int4 --threads 1 --repeats 9
run fpebc-forward-1thread --module fpebc --preset pooling --mode forward --threads 1 --repeats 30
run mc --module mc --repeats 15
run train-l20-threads1 --preset dlrm --mode train --pooling-factor 20 --providers 'eb_loop,jaggedrec[torch],fbgemm' --busy 0,1 --threads 1 --repeats 15
echo "== done $(date -u +%H:%M:%S) $(uptime)" >> load.log
