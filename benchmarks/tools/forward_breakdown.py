"""Where a CPU forward's time goes: the whole module, then each thing it does, alone.

    python benchmarks/tools/forward_breakdown.py [--tables 26] [--rows 100000] [--dim 64]
        [--batch-size 4096] [--pooling-factor 1] [--bag-size fixed] [--dtype fp32] [--rounds 15]
        [--threads N]

Times, on the same tables and batches: jaggedrec's module (with and without ``validate``),
the op it calls, the parts of the op's path (the per-batch checks, the offsets, the id shift,
the row gather), and the two baselines of the benchmark CLI, a loop of ``nn.EmbeddingBag`` and
FBGEMM's CPU TBE (when it imports). Every part runs once per round, in an order rotated each
round, on one of three batches in turn, so that neighbours on a shared machine slow all of
them alike; medians over the rounds. Parts are timed alone, so they need not add up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec.modules import validation

from jaggedrec.benchmarks.workload import Workload, make_batches, reference_tables
from shape_args import add_shape_arguments


def _parts(w: Workload, tables: List[torch.Tensor], batch) -> Dict[str, Callable[[], object]]:
    configs = [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=table.shape[1], num_embeddings=table.shape[0],
                                     feature_names=[f"f{t}"], data_type=jr.DataType[w.dtype.upper()])
               for t, table in enumerate(tables)]
    ebc = jr.EmbeddingBagCollection(configs)
    with torch.no_grad():
        for t, table in enumerate(tables):
            ebc.embedding_bags[f"t{t}"].weight.copy_(table)
    unchecked = jr.EmbeddingBagCollection(configs, validate=False)
    unchecked.load_state_dict(ebc.state_dict())
    keys = [f"f{t}" for t in range(len(tables))]

    def kjt():  # a data loader hands over a fresh KJT each step
        return jr.KeyedJaggedTensor(keys, batch.values, lengths=batch.lengths)

    group = ebc._layout.groups[0]
    flat = ebc.flat_weights[group.name]
    offsets = kjt().lookup_offsets()
    num_keys, size = len(keys), w.batch_size
    block = flat.detach().view(-1, tables[0].shape[1]) if len(set(w.table_dims)) == 1 else None
    base = torch.tensor(ebc._layout.groups[0].weight_offsets) // tables[0].shape[1]

    def op():
        return torch.ops.jaggedrec.pooled_embedding_bags(
            flat, batch.values, offsets, None, None, group.feature_tables(range(num_keys), num_keys), "torch", False,
            True, 0, [])

    parts = {
        "jaggedrec module (validate=True)": lambda: ebc(kjt()),
        "jaggedrec module (validate=False)": lambda: unchecked(kjt()),
        "  the op alone (pooled_embedding_bags)": op,
        "  checks: shapes and dtypes": lambda: validation.check_static(kjt(), ebc._spec),
        "  checks: lengths and id ranges (one read to the host)": lambda: validation.check_data(kjt(), ebc._spec),
        "  offsets from lengths (cumsum)": lambda: kjt().lookup_offsets(),
    }
    if block is not None and w.pooling_factor == 1 and w.bag_size == "fixed":
        shifted = (batch.values.view(num_keys, size).t() + base).reshape(-1)
        one_each = torch.arange(shifted.numel() + 1)
        parts.update({
            "  one id per bag: the id shift into [B, F] order": lambda: batch.values.view(num_keys, size).t() + base,
            "  one id per bag: the row gather (embedding_bag, as the op)": lambda: F.embedding_bag(
                shifted, block, one_each, mode="sum", include_last_offset=True),
            "  one id per bag: the row gather (index_select)": lambda: block.index_select(0, shifted),
        })
    loop = [torch.nn.EmbeddingBag.from_pretrained(t, mode="sum") for t in tables]
    starts = [0] + torch.tensor(batch.ids_per_feature).cumsum(0).tolist()
    bag_starts = [batch.offsets[t * size:(t + 1) * size] - starts[t] for t in range(len(tables))]
    parts["baseline: loop of nn.EmbeddingBag"] = lambda: torch.cat(
        [bag(batch.values[starts[t]:starts[t + 1]], bag_starts[t]) for t, bag in enumerate(loop)], dim=1)
    tbe = _fbgemm(tables, w)
    if tbe is not None:
        parts["baseline: FBGEMM CPU TBE"] = lambda: tbe(batch.values, batch.offsets)
    return parts


def _fbgemm(tables, w):
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    except Exception:  # not installed, or a mismatched native library
        return None
    precision = {"fp32": SparseType.FP32, "fp16": SparseType.FP16}.get(w.dtype)
    if precision is None:
        return None
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(t.shape[0], t.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables],
        optimizer=EmbOptimType.EXACT_SGD, weights_precision=precision, output_dtype=SparseType.FP32,
        device=torch.device("cpu"))
    with torch.no_grad():
        for dst, src in zip(tbe.split_embedding_weights(), tables):
            dst.copy_(src)
    return tbe


def measure(w: Workload, rounds: int) -> Dict[str, float]:
    tables = reference_tables(w)
    per_batch = [_parts(w, tables, b) for b in make_batches(w, 3)]
    names = list(per_batch[0])
    samples: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad():
        for parts in per_batch:  # warm up every part on every batch
            for fn in parts.values():
                fn()
        for r in range(rounds):
            parts = per_batch[r % len(per_batch)]
            order = names[r % len(names):] + names[:r % len(names)]
            for name in (order if r % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                parts[name]()
                samples[name].append(time.perf_counter() - start)
    return {n: statistics.median(s) * 1e3 for n, s in samples.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, pooling_factor=1.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(tables=args.tables, num_embeddings=args.rows, dims=(args.dim,), batch_size=args.batch_size,
                 pooling_factor=args.pooling_factor, bag_size=args.bag_size, dtype=args.dtype)
    times = measure(w, args.rounds)
    width = max(map(len, times))
    print(f"{args.tables} tables x {args.rows:,} rows, dim {args.dim}, {args.dtype}, batch {args.batch_size}, "
          f"{args.pooling_factor:g} ids/bag ({args.bag_size}); {torch.get_num_threads()} threads; "
          f"median ms of {args.rounds} rounds")
    for name, ms in times.items():
        print(f"{name:<{width}}  {ms:8.3f}")


if __name__ == "__main__":
    main()
