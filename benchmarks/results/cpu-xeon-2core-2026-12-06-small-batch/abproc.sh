#!/bin/bash
# Alternate "before" (a copy of 9bf135c's jaggedrec/ at $BASE, first on PYTHONPATH) and "after" (the work
# tree) processes, twice each; each process times the providers' steps one after another, round-robin
# (prof.py: thread CPU time and wall time, medians). Args go to prof.py, e.g.
#   ./abproc.sh --preset dlrm --mode train --threads 1 --reps 15 --providers 'eb_loop,jaggedrec[torch]'
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
BASE=${BASE:-/tmp/T/base}
cd /tmp
for i in 1 2; do
  echo "before:"; PYTHONPATH=$BASE timeout 600 $PY "$HERE/prof.py" "$@" 2>&1 | grep -v "^W12"
  echo "after:";  timeout 600 $PY "$HERE/prof.py" "$@" 2>&1 | grep -v "^W12"
done
