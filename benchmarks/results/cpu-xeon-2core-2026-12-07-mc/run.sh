#!/usr/bin/env bash
# Quiet reruns (nothing else of ours running; uptime logged before and after each):
#   cd benchmarks/results/cpu-xeon-2core-2026-12-07-mc && B=../../../.venv/bin/jaggedrec-bench P=../../../.venv/bin/python ./run.sh
set -u
B=${B:-jaggedrec-bench}
P=${P:-python}
log() { echo "== $1 $(date -u +%H:%M:%S) $(uptime)" >> load.log; }
log mc-1; "$B" --module mc --repeats 15 --no-progress --same-rows --output mc-1.json > mc-1.txt 2>&1
log floor; "$P" floor.py 20 > floor.txt 2>&1
log mc-2; "$B" --module mc --repeats 15 --no-progress --same-rows --output mc-2.json > mc-2.txt 2>&1
log done
