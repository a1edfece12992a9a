"""Bytes the backward's index glue (contributions, sort into runs, each contribution's gradient
row and factor) moves on CUDA, by formula, before and after the marks kernel took over the
op layer's _bag_rows; the run-sum / fused-step kernel that follows is the same in both and
left out. An estimate, not a measurement: every access counted at its useful bytes (gathers
from small tables such as meta as free, other gathers at their element size), int64 ids and
offsets, fp32 per-sample weights, int32 sort keys (the flat weights are < 2**31 elements),
torch.sort as CUB's radix sort of (int32 key, int64 index) pairs, 4 passes of 8 bits, each
reading and writing both, plus the index fill and a histogram read; a cumsum reads and writes once.

    python glue_bytes.py        (the dlrm preset: 26 tables x 100k rows x 64, B 4096, L 1 and 20)
"""

import math

TABLES, ROWS, BATCH = 26, 100_000, 4096


def distinct_fraction(length):
    """Runs per contribution for uniform random ids: expected distinct rows of a table / its ids."""
    ids = BATCH * length
    return ROWS * (1 - math.exp(-ids / ROWS)) / ids


def glue_bytes(length, weighted_mean, after):
    n = TABLES * BATCH * length   # ids = contributions (one pass: every key read by one table)
    bags = TABLES * BATCH
    u = distinct_fraction(length)  # runs per contribution
    per = {}
    per["contributions kernel"] = 8 * (bags + 1) / n + 8 + 4 + 8 + 8  # offsets, ids; feature, row, bag
    per["rows.to(int32)"] = 8 + 4
    per["torch.sort (CUB, 4 passes)"] = 8 + 12 + 4 * 24
    marks = 4 + 8 + 4 + 4 + 8          # sorted rows, order, feature gather; starts, sorted feature
    if after:
        marks += 8 + 8                 # bag gather; item_offset
        if weighted_mean:
            marks += 4 + 16 + 4        # psw gather, the bag's two offsets; scale
    per["marks kernel"] = marks
    if not after:
        # _bag_rows: order % N, bag_of_value.index_select, % B, * stride, meta[feature, column], +
        glue = 16 + 24 + 16 + 16 + 16 + 24
        if weighted_mean:
            # psw.index_select, lengths.index_select, clamp, .float(), reciprocal, * 1.0,
            # meta[feature, mean], != 0, where, scale * inverse (lengths: per bag, small)
            glue += 16 + 24 + 16 + 12 + 8 + 8 + 16 + 9 + 9 + 12 + 24 * bags / n
        per["_bag_rows torch ops"] = glue
        per["run_start fill"] = 8
    per["cumsum of run starts"] = 4 + 8
    per["layout kernel"] = 4 + 8 + u * (4 + 8 + 3 * 8) + (8 * (1 - u) if after else 0)
    per["long marks kernel"] = 8 * u + 4
    per["cumsum of long marks"] = 4 + 8
    per["long layout kernel"] = 4 + 8 + 8
    return n, {k: v * n for k, v in per.items()}


for length in (1, 20):
    for weighted_mean in (False, True):
        totals = []
        for after in (False, True):
            n, parts = glue_bytes(length, weighted_mean, after)
            totals.append(sum(parts.values()))
        label = "weighted MEAN" if weighted_mean else "SUM"
        print(f"L={length:2d} {label:13s} N={n:>9,d}  before {totals[0] / 1e6:7.1f} MB  after {totals[1] / 1e6:7.1f} MB"
              f"  ({totals[1] / totals[0]:.2f}x; {totals[0] / n:.0f} -> {totals[1] / n:.0f} B per id)")
        if length == 20 and weighted_mean:
            for after in (False, True):
                for name, value in glue_bytes(length, weighted_mean, after)[1].items():
                    print(f"    {'after ' if after else 'before'} {name:28s} {value / 1e6:7.1f} MB")
