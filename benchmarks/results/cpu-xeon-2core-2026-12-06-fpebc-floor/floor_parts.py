"""FPEBC forward against the unweighted collection, part by part, in one process.

    .venv/bin/python benchmarks/results/cpu-xeon-2core-2026-12-06-fpebc-floor/floor_parts.py 40 20 50 100

The ``pooling`` preset's batches (8 tables x 100k rows, dim 64, batch 1024, random bags), one
torch thread, thread CPU time (``time.thread_time``: what other work on a shared machine steals
is not counted), rows alternating forward and backward order each round, medians. Rows:

- ``ebc``: jaggedrec's unweighted collection (``jaggedrec[torch]``), the 1.00x;
- ``weighted``: the FPEBC's weighted collection given ``[N]`` weights made beforehand (the
  position weights' values gathered for that batch) in a KJT built in the step, as ``ebc``'s:
  the pooling alone. Every row reads one copy of the tables (the unweighted collection's
  flat parameters share the FPEBC's storage);
- ``fpebc_op``: the FPEBC through the custom op (before commit 2242f42);
- ``fpebc``: the FPEBC as now (inference skips the dispatcher);
- the build of the ``[N]`` weights, step by step as ``position_pooled.position_index`` and the
  torch path run it: ``fill`` (the ``[N+1]`` int32 steps of ones), ``cumsum_`` (the running
  sum that turns steps into each id's index), ``gather`` (``index_select`` of the position
  weights by that index); ``bag_steps`` (the per-bag work: the steps at bag starts);
- ``pool`` and ``pool_w``: the op layer's torch path (``pooled_torch.pooled_forward``) on the
  FPEBC's own flat tables, without and with the ready ``[N]`` weights, and ``op``: the FPEBC's
  op body on the same tables (``_position_weighted_embedding_bags``), without the modules'
  per-batch work (reading and checking the KJT);
- ``module``: what the FPEBC module does before the op (the key-position table, bag-length
  check, the weighted KJT), measured as ``pool_by_position`` with the pooling stubbed out.

``floor`` = ``weighted`` + ``cumsum_`` + ``gather``: the pooling, plus the two passes over the
ids any torch-op build needs (one running sum to number the ids in their bags, one gather of
the weights; torch's ``embedding_bag`` reads only per-id weights).
"""
import statistics
import sys
import time

import torch

from jaggedrec.benchmarks.providers.fp import JaggedrecFPEBC
from jaggedrec.benchmarks.providers.jaggedrec import Jaggedrec
from jaggedrec.benchmarks.workload import Workload, make_batches, reference_tables
from jaggedrec.modules import batch as batch_reader
from jaggedrec.modules import fp_embedding_modules as fpm
from jaggedrec.modules.feature_processor_ import keyed_position_table
from jaggedrec.ops import pooled_torch
from jaggedrec.ops import position_pooled as pp
from jaggedrec.ops.backends import batch_inputs
from jaggedrec.ops.feature_tables import feature_tables

torch.set_num_threads(1)
ITERS = int(sys.argv[1])
RUN_NOW = pp.run_position_weighted_embedding_bags


def run_through_op(*args):
    pooled, bad_ids, _ = pp.position_weighted_embedding_bags(*args)
    return pooled, bad_ids


def main(pooling: float) -> None:
    w = Workload(tables=8, num_embeddings=100_000, dims=(64,), batch_size=1024, bag_size="random",
                 pooling_factor=pooling)
    tables = reference_tables(w)
    batch = make_batches(w, 1)[0]
    ebc, fp = Jaggedrec("torch"), JaggedrecFPEBC()
    ebc.build(tables, w)
    fp.build(tables, w)
    weighted = fp.module.split()[1]  # the FPEBC's own weighted collection
    for name, flat in ebc.module.flat_weights.items():
        # every row reads the same 195 MB of tables: where two copies land in memory moved
        # the unweighted and weighted rows ~25% apart at 20 ids per bag on the loaded machine
        flat.data = weighted.flat_weights[name].data
    kjt = batch.jaggedrec_kjt(w.keys)
    tabs = fp.module.split()[0].position_weights_dict
    pw, key_positions = keyed_position_table(kjt, tabs, "floor")
    pw = pw.detach()
    offsets, num_ids = kjt.offsets(), kjt.values().shape[0]
    bases = key_positions[0::2]
    index = pp.position_index(offsets, bases, num_ids)
    psw = pw.index_select(0, index)
    weighted_kjt = type(kjt)(w.keys, kjt.values(), psw, lengths=kjt.lengths())
    steps = torch.ones(num_ids + 1, dtype=torch.int32)
    jumps = pp._cached_bag_jumps(tuple(bases), w.batch_size, torch.int32, offsets.device)  # noqa: SLF001
    starts = offsets[:-1]
    scratch = torch.zeros(num_ids + 1, dtype=torch.int32)

    def bag_steps():
        change = jumps - starts.to(torch.int32)
        change[1:] += starts[:-1].to(torch.int32)
        scratch.index_add_(0, starts.long(), change)

    def fpebc_with(run):
        def forward():
            pp.run_position_weighted_embedding_bags = run
            try:
                return fp.forward(batch)
            finally:
                pp.run_position_weighted_embedding_bags = RUN_NOW
        return forward

    pool = weighted.pool_position_weighted
    group = weighted._groups[0]  # noqa: SLF001 (one dim, one group)
    flat = weighted.flat_weights[group.name].detach()
    read = batch_reader.read_batch(weighted_kjt, weighted._spec, weighted._groups,  # noqa: SLF001
                                   weighted._output_features, False)  # noqa: SLF001
    info = feature_tables(read.group_tables[0])
    op_args = (flat, read.values, read.offsets, pw, None, read.group_tables[0], key_positions, "torch", False,
               False, 0, [])

    def module_only():
        weighted.pool_position_weighted = lambda features, position_weights: None
        try:
            fpm.pool_by_position(weighted, batch.jaggedrec_kjt(w.keys), tabs)
        finally:
            weighted.pool_position_weighted = pool

    cases = {
        "ebc": lambda: ebc.forward(batch),
        "weighted": lambda: weighted(type(kjt)(w.keys, batch.values, psw, lengths=batch.lengths)),
        "fpebc_op": fpebc_with(run_through_op),
        "fpebc": fpebc_with(RUN_NOW),
        "pool": lambda: pooled_torch.pooled_forward(flat, batch_inputs(read.values, read.offsets, None, None), info),
        "pool_w": lambda: pooled_torch.pooled_forward(flat, batch_inputs(read.values, read.offsets, psw, None), info),
        "op": lambda: pp._position_weighted_embedding_bags(*op_args),  # noqa: SLF001
        "fill": lambda: torch.ones(num_ids + 1, dtype=torch.int32),
        "cumsum_": lambda: steps.clone().cumsum_(0),
        "clone": lambda: steps.clone(),
        "gather": lambda: pw.index_select(0, index),
        "bag_steps": bag_steps,
        "module": module_only,
    }
    times = {k: [] for k in cases}
    with torch.no_grad():
        expected = ebc.forward(batch)
        torch.testing.assert_close(weighted(weighted_kjt).values(), expected)
        torch.testing.assert_close(fp.forward(batch), expected)
        for f in cases.values():
            f()
        for i in range(ITERS):
            order = list(cases.items())
            for name, f in (order if i % 2 else order[::-1]):
                t = time.thread_time()
                f()
                times[name].append(time.thread_time() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["cumsum_"] = max(med["cumsum_"] - med["clone"], 0.0)  # the clone only restores the steps
    del med["clone"]
    base = med["ebc"]
    print(f"{pooling:g} ids/bag, {num_ids} ids: thread CPU ms (x ebc), median of {ITERS}")
    for name, m in med.items():
        print(f"  {name:10s} {m * 1e3:8.3f}  {m / base:6.3f}x  {m / num_ids * 1e9:5.2f} ns/id")
    floor = med["weighted"] + med["cumsum_"] + med["gather"]
    print(f"  {'floor':10s} {floor * 1e3:8.3f}  {floor / base:6.3f}x  (weighted + cumsum_ + gather)")
    pool = med["pool"]
    print(f"  same tables, x pool: pool_w {med['pool_w'] / pool:.3f}x, op {med['op'] / pool:.3f}x, floor "
          f"{(med['pool_w'] + med['cumsum_'] + med['gather']) / pool:.3f}x (pool_w + cumsum_ + gather)")


for factor in sys.argv[2:]:
    main(float(factor))
