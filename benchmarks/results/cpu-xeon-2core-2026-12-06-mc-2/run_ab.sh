#!/bin/sh
# Before / after in alternation, one process per run: the library from two worktrees of the
# session's base commit (before: 9bf135c as is; after: 9bf135c with this session's three library
# files copied in), the benchmark code of main (benchmarks/providers/mc.py, --same-rows) for both.
#   git worktree add --detach /tmp/hH6/wt_before 9bf135c
#   git worktree add --detach /tmp/hH6/wt_after 9bf135c
#   cp jaggedrec/ops/hash_probe_torch.py /tmp/hH6/wt_after/jaggedrec/ops/
#   cp jaggedrec/modules/hash_table.py /tmp/hH6/wt_after/jaggedrec/modules/
#   cp jaggedrec/modules/hash_embedding_modules.py /tmp/hH6/wt_after/jaggedrec/modules/
# Run from /work/main: sh run_ab.sh <out dir>
OUT=${1:-.}
PY=/work/main/.venv/bin/python
for run in 1 2; do
  for tree in before after; do
    TREE=/tmp/hH6/wt_$tree
    uptime
    (cd $TREE && PYTHONPATH=$TREE $PY -c "
import jaggedrec, jaggedrec.ops.hash_probe_torch as hp, jaggedrec.modules.hash_table as ht
assert jaggedrec.__file__.startswith('$TREE') and hp.__file__.startswith('$TREE') and ht.__file__.startswith('$TREE')
from jaggedrec.benchmarks.providers import mc
assert mc.__file__.startswith('/work/main/benchmarks'), mc.__file__
mc.main(['--module', 'mc', '--repeats', '15', '--no-progress', '--same-rows', '--output', '$OUT/mc-$tree-$run.json'])
" 2>&1 | grep -v -e is_fx_tracing -e '^W1206')
  done
done
uptime
