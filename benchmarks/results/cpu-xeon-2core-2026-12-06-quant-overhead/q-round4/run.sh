#!/bin/bash
# before/after alternate, preset by preset, as the quiet README's command (CLI, 1 thread, repeats 15)
for cfg in "tutorial:--preset tutorial" "tutorial2:--preset tutorial" "dlrm:--preset dlrm" "dlrm-20:--preset dlrm --pooling-factor 20"; do
  name=${cfg%%:*}; flags=${cfg#*:}
  for t in before after; do
    if [ $t = before ]; then P=/tmp/q/before; else P=/work/main; fi
    echo "$(date -u +%H:%M:%S) $t $name $(cat /proc/loadavg)" >> load.log
    PYTHONPATH=$P timeout 900 /work/main/.venv/bin/jaggedrec-bench $flags --mode forward --dtype int8,int4 --threads 1 --repeats 15 --no-progress --output $t-$name.json > $t-$name.txt 2>&1
  done
done
echo "$(date -u +%H:%M:%S) end $(cat /proc/loadavg)" >> load.log
