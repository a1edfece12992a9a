"""What a CPU training step cannot avoid, timed with the torch ops it would use.

    python benchmarks/tools/cpu_floor.py [--tables 26] [--rows 100000] [--dim 64]
        [--batch-size 4096] [--pooling-factor 20] [--repeats 7]

A fused SGD step over the fused-optimizer issue's shapes must at least gather every id's row
(the forward), sort the ids by row, sum each touched row's gradient, and read and write back
every touched row: either only those rows, scattered, or every row of the tables in order
(untouched ones get a zero gradient), which streams faster when many rows were touched. This
times each of those alone, on the same random ids, with every torch op that can write rows
back, so that a step time can be compared with the sum of its parts.
Medians over ``--repeats``; each op runs on the same data every time, so caches favour it
(a lower bound, as a floor should be).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from jaggedrec.ops.host_memory import advise_huge_pages, retain_freed_memory

from shape_args import add_shape_arguments

# Rows per chunk in the write-back timings: the same 2 MB (at dim 64) as the fused step.
_CHUNK = 8192


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(tables: int, rows: int, dim: int, batch_size: int, pooling_factor: int, repeats: int,
            seed: int = 0) -> Dict[str, float]:
    """Median ms of each part, keyed by a short description."""
    gen = torch.Generator().manual_seed(seed)
    retain_freed_memory()
    total_rows = tables * rows
    weights = torch.empty(total_rows * dim)
    advise_huge_pages(weights)
    weights = weights.view(total_rows, dim).uniform_(-0.01, 0.01)
    lengths = torch.randint(0, 2 * pooling_factor + 1, (tables * batch_size,), generator=gen)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    ids = torch.randint(0, rows, (int(offsets[-1]),), generator=gen)
    key_starts = offsets[::batch_size]
    ids += torch.repeat_interleave(torch.arange(tables) * rows, key_starts[1:] - key_starts[:-1])  # global rows
    bag_grads = torch.randn(tables * batch_size, dim, generator=gen)
    bag_of_id = torch.repeat_interleave(torch.arange(tables * batch_size, dtype=torch.int32), lengths)

    sorted_ids, order = torch.sort(ids.int(), stable=True)
    touched, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    run_offsets = F.pad(counts.cumsum(0), (1, 0))
    run_bags = bag_of_id.index_select(0, order)
    touched = touched.long()
    chunks = [touched[lo:lo + _CHUNK] for lo in range(0, touched.numel(), _CHUNK)]
    buffer = torch.randn(_CHUNK, dim, generator=gen)

    def each_chunk(write: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for rows_ in chunks:
                write(rows_, buffer[:rows_.numel()])
        return run

    every_row_offsets = F.pad(torch.bincount(sorted_ids, minlength=total_rows).cumsum(0), (1, 0))
    row_chunks = list(range(0, total_rows, _CHUNK)) + [total_rows]
    chunk_first_ids = every_row_offsets[row_chunks].tolist()

    def stream() -> None:
        for lo, hi, a, b in zip(row_chunks, row_chunks[1:], chunk_first_ids, chunk_first_ids[1:]):
            sums = F.embedding_bag(run_bags[a:b], bag_grads, every_row_offsets[lo:hi + 1] - a, mode="sum",
                                   include_last_offset=True)
            weights[lo:hi].add_(sums, alpha=-1e-6)

    sparse = torch.sparse_coo_tensor(touched.unsqueeze(0), torch.randn(touched.numel(), dim, generator=gen),
                                     weights.shape, is_coalesced=True, check_invariants=False)
    parts = {
        f"forward gather: embedding_bag over {ids.numel():,} ids": lambda: F.embedding_bag(
            ids, weights, offsets, mode="sum", include_last_offset=True),
        f"sort {ids.numel():,} int32 ids (stable)": lambda: torch.sort(ids.int(), stable=True),
        "sum each touched row's gradient (embedding_bag over the runs)": lambda: F.embedding_bag(
            run_bags, bag_grads, run_offsets, mode="sum", include_last_offset=True),
        f"gather the {touched.numel():,} touched rows (index_select)": each_chunk(
            lambda r, b: torch.index_select(weights, 0, r, out=b)),
        "write back: index_copy_": each_chunk(lambda r, b: weights.index_copy_(0, r, b)),
        "write back: index_put_": each_chunk(lambda r, b: weights.index_put_((r,), b)),
        "write back: scatter_add_": lambda: weights.scatter_add_(
            0, touched.unsqueeze(1).expand(-1, dim), sparse.values()),
        "write back: dense += sparse": lambda: weights.add_(sparse, alpha=-0.01),
        "write back: index_add_": lambda: weights.index_add_(0, touched, sparse.values(), alpha=-0.01),
        "streamed: per 8192 rows in order, sum each row's gradient and add it in place": stream,
    }
    return {name: _median_ms(fn, repeats) for name, fn in parts.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, pooling_factor=20, bags_and_dtype=False)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    times = measure(args.tables, args.rows, args.dim, args.batch_size, args.pooling_factor, args.repeats)
    width = max(map(len, times))
    for name, ms in times.items():
        print(f"{name:<{width}}  {ms:8.1f} ms")
    forward, sort, sums, gather = list(times.values())[:4]
    scattered = forward + sort + sums + gather + min(ms for name, ms in times.items() if name.startswith("write back"))
    streamed = forward + sort + times[next(name for name in times if name.startswith("streamed"))]
    print(f"{'floor, touched rows scattered: the first four, fastest write back':<{width}}  {scattered:8.1f} ms")
    print(f"{'floor, every row streamed: forward, sort, streamed':<{width}}  {streamed:8.1f} ms"
          f"  ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
