"""Pooled bags of hashed tables read from raw ids: the probe-and-gather launch
(``kernels/hash_probe.py``) on the Triton path, and the same contract on torch ops (look up,
then pool) as its reference.

Both take the per-key metadata of :func:`probe_meta` and return ``[B, total_dim]`` fp32 plus
``[K]`` int64 counts of the ids that read their table's fallback row. Forward only: eval and
inference (training places ids first, see ``hash_probe_torch.train_step``, and then reads the
placed rows through the collection's own op, whose backward steps them).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch

from jaggedrec.ops import hash_probe_torch as hp


class KeyTable(NamedTuple):
    """What the probe needs of one KJT key (``hashed`` False: ids are rows of a static table)."""

    weight_offset: int  # first element of the key's table in the flat weights
    dim: int
    out_column: int
    mean: bool
    hashed: bool
    bucket_base: int = 0
    num_buckets: int = 1
    slot_base: int = 0  # the table's first slot in the slot space
    fallback_row: int = 0


def probe_meta(tables: Sequence[KeyTable], device) -> torch.Tensor:
    """``[K, HASH_FIELDS]`` int64, in ``kernels/hash_probe.py``'s field order."""
    rows = [(t.weight_offset, t.dim, t.out_column, int(t.mean), int(t.hashed), t.bucket_base, t.num_buckets,
             t.slot_base, t.fallback_row) for t in tables]
    return torch.tensor(rows, dtype=torch.int64, device=device).view(len(rows), 9)


def probe_alignment(tables: Sequence[KeyTable]) -> int:
    """The launch's ``DIM_ALIGN``: 4 (16 bytes of fp32) where 4 divides every read key's dim,
    weight offset and output column, else 1; the kernel promises it to the compiler, which
    then moves rows in 16-byte vectors."""
    read = [t for t in tables if t.dim]
    aligned = all((t.dim | t.weight_offset | t.out_column) % 4 == 0 for t in read)
    # not 2 where 4 fails: 8-byte rows at 128-wide tiles held the kernel at 128 registers with a
    # spill in its loop (sm_90a, triton 3.9); scalar rows take ~170 and none
    return 4 if aligned else 1


def probe_pooled_torch(keys: torch.Tensor, bucket_size: int, weights: torch.Tensor, values: torch.Tensor,
                       offsets: torch.Tensor, tables: Sequence[KeyTable], batch_size: int,
                       total_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch path: rows by :func:`hash_probe_torch.lookup`, then one ``embedding_bag`` a key.

    Args:
        keys: ``[num_slots + 1]`` int64; weights: flat fp32 storage; values: ``[N]`` raw ids;
        offsets: ``[K*B+1]``; tables: one per key; batch_size: B; total_dim: output width.
    """
    out = torch.zeros(batch_size, total_dim, dtype=torch.float32, device=weights.device)
    counts = torch.zeros(len(tables), dtype=torch.int64, device=weights.device)
    raw = values.to(torch.int64)
    for k, t in enumerate(tables):
        if t.dim == 0:  # a key the collection does not read
            continue
        lo, hi = offsets[k * batch_size], offsets[(k + 1) * batch_size]
        ids = raw[lo:hi]
        bag_offsets = offsets[k * batch_size:(k + 1) * batch_size] - lo
        if t.hashed:
            buckets = hp.bucket_of(hp.mix(ids), t.bucket_base, t.num_buckets)
            slot = hp.lookup(keys, bucket_size, ids, buckets, torch.ones_like(ids, dtype=torch.bool))
            rows = torch.where(slot >= 0, slot - t.slot_base, t.fallback_row)
            counts[k] = (slot < 0).sum()
        else:
            rows = ids
        table = weights.narrow(0, t.weight_offset, weights.numel() - t.weight_offset)
        table = table.narrow(0, 0, (table.numel() // t.dim) * t.dim).view(-1, t.dim)
        pooled = torch.nn.functional.embedding_bag(rows, table, bag_offsets, mode="mean" if t.mean else "sum")
        out[:, t.out_column:t.out_column + t.dim] = pooled
    return out, counts


def probe_pooled_triton(keys: torch.Tensor, bucket_size: int, weights: torch.Tensor, values: torch.Tensor,
                        offsets: torch.Tensor, meta: torch.Tensor, batch_size: int, total_dim: int,
                        max_dim: int, dim_align: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch of ``hash_probe_pooled_kernel``, a program per block of bags (arguments as
    :func:`probe_pooled_torch`'s, ``meta`` from :func:`probe_meta`; ``dim_align`` from
    :func:`probe_alignment` of the same tables: 1, the default, makes no promise, and the rows
    move a float at a time)."""
    import triton

    from jaggedrec.kernels import hash_probe  # imported here: the torch path needs no triton
    from jaggedrec.kernels.common import block_d

    num_keys = meta.shape[0]
    out = torch.empty(batch_size, total_dim, dtype=torch.float32, device=weights.device)
    counts = torch.zeros(num_keys, dtype=torch.int64, device=weights.device)
    num_bags = num_keys * batch_size
    # 16 bags a block at any tile width: 32 bags spilled inside the loop at dim 64 on triton 3.6 (sm_90a)
    # before the loop was pipelined. Buckets narrower than 8 are probed through a window of 8 keys
    # (the slots past the bucket masked off): at 1, 2 or 4 the narrow [16, BUCKET_SIZE] tiles took
    # 200-255 registers, and 255 with spills at 128-wide tiles, where 8 takes ~115
    bags_per_block = 16
    if num_bags:
        grid = (triton.cdiv(num_bags, bags_per_block),)
        hash_probe.hash_probe_pooled_kernel[grid](values, offsets, keys, weights, out, meta, counts, batch_size,
                                                  total_dim, num_bags, BUCKET_SIZE=bucket_size, BLOCK_D=block_d(max_dim),
                                                  BLOCK_B=bags_per_block, DIM_ALIGN=dim_align,
                                                  WINDOW=max(bucket_size, 8), num_warps=4)
    return out, counts
