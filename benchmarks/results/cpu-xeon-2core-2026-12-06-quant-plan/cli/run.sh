#!/bin/bash
# A/B of the quantized forward, trees alternating per run: before = /tmp/q5/base (main before ad7dac1), after = /work/main
cd /tmp
name=$1; shift
for round in 1 2; do
  for tree in before after; do
    if [ $tree = before ]; then P=/tmp/q5/base; else P=/work/main; fi
    echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg)" >> /tmp/q5/cli/load.log
    PYTHONPATH=$P /work/main/.venv/bin/jaggedrec-bench "$@" --mode forward --dtype int8,int4 --threads 1 --repeats 15 \
        --no-progress --output /tmp/q5/cli/$tree-$name-$round.json > /tmp/q5/cli/$tree-$name-$round.txt 2>&1
  done
done
