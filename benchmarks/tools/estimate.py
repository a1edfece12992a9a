"""Bandwidth estimates from machine code, by Little's law: not measurements.

A multiprocessor keeps ``blocks_per_sm`` programs resident (the report's occupancy); a
program moves its bytes in a chain of serial DRAM round trips (the report's prologue and
per-iteration round trips from the scoreboard bits), each costing one DRAM latency. So a
multiprocessor moves ``blocks_per_sm x bytes per program`` per ``round trips x latency``,
and the GPU 132 times that; where that asks more than the copy bandwidth, the memory is the
limit, not the latency (the estimate is then 100% of copy). Every figure here holds only as
far as these hold: a round trip costs the full latency and nothing else does (no issue or
arithmetic limit, no cache hits, no tail of the last wave).

The workload is the dlrm preset's CUDA shape (benchmarks/presets.py): 26 tables of 500,000
rows, 16,384 bags per table, ids spread uniformly, at 1 and 20 ids per bag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

MULTIPROCESSORS = 132
TABLES, ROWS, BATCH = 26, 500_000, 16384
LATENCIES_NS = (900, 1200)
IDS_PER_BAG = (1, 20)


@dataclasses.dataclass
class Card:
    name: str
    peak_tbps: float  # the datasheet's DRAM bandwidth
    copy_tbps: float  # a device-to-device copy, bytes read plus written
    source: str


CARDS = [Card("H100", 3.35, 3.0, "SXM datasheet peak; copy about 90% of it, not measured here"),
         Card("H200", 4.8, 4.3, "datasheet peak; copy measured on this workplace's H200 (device/KINDS.md, 2026-10-28)")]

# fp32 optimizer state bytes read and written per row of dim D (pooled_fused's state1/state2)
STATE_BYTES = {1: lambda d: 0, 2: lambda d: 8, 3: lambda d: 16 * d, 4: lambda d: 8 * d, 5: lambda d: 8 * d,
               6: lambda d: 8 * d + 8, 7: lambda d: 16 * d, 8: lambda d: 8 * d + 8, 9: lambda d: 8,
               10: lambda d: 16, 11: lambda d: 16 * d, 12: lambda d: 8 * d}
OPTIMIZERS = {1: "SGD", 2: "row-wise Adagrad", 3: "Adam", 4: "exact Adagrad", 5: "LARS-SGD",
              6: "partial row-wise Adam", 7: "LAMB", 8: "partial row-wise LAMB", 9: "row-wise Adagrad (decoupled)",
              10: "row-wise Adagrad (counter)", 11: "Adam (decoupled)", 12: "exact Adagrad (decoupled)"}


# persistent kernels whose loop starts on dead blocks (masks off) to fill its pipeline, instead of
# fill code before the loop: iterations of the loop paid once per program, as the prologue is
DEAD_BLOCKS = {"fwd_short": 4}
# loops pipelined over their own iterations (positions), which start on dead positions and run past
# the last: the iterations beyond one a position that still wait a round trip (kernels/hash_probe.py:
# an id, its keys and its row in three iterations, so L + 2 for bags of L ids)
PIPELINE_FILL = {"hash_probe": 2}


def _gpu_rate(blocks_per_sm: int, bytes_per_program: float, round_trips: float, latency_ns: float) -> float:
    """Bytes per second the resident programs move, by Little's law."""
    return MULTIPROCESSORS * blocks_per_sm * bytes_per_program / (max(round_trips, 1) * latency_ns * 1e-9)


def forward(r, ids_per_bag: int, dim: int, row_bytes: float, id_bytes: int, weighted: bool, card: Card,
            latency_ns: float) -> float:
    """A forward's fraction of copy bandwidth: each program pools BLOCK_B bags, reading each id
    (and per-id weight), each row as stored (``row_bytes``: a quantized row's stride, codes
    with scale and bias) and its bag's offsets, and writing the fp32 pooled row."""
    c = r.constexprs
    block, unroll = c.get("BLOCK_B", 1), c.get("UNROLL", 1)
    per_bag = ids_per_bag * (row_bytes + id_bytes + (4 if weighted else 0)) + 2 * id_bytes + 4 * dim
    if getattr(r, "persistent", False):
        # a persistent short-bag forward: a block of bags per loop iteration (at most SHORT ids a bag),
        # the pipeline's fill paid once per program over its share of the blocks
        if ids_per_bag > c.get("SHORT", 1):
            return float("nan")  # the op takes the general kernel for such bags
        resident = min(r.blocks_per_sm, launched_per_sm(r))
        blocks = TABLES * math.ceil(BATCH / block) / (MULTIPROCESSORS * max(resident, 1))
        fill = r.prologue_round_trips + DEAD_BLOCKS.get(r.kernel, 0) * r.round_trips
        trips = r.round_trips + fill / max(blocks, 1)
    else:
        resident = r.blocks_per_sm
        iterations = math.ceil(ids_per_bag / unroll) + PIPELINE_FILL.get(r.kernel, 0)
        trips = r.prologue_round_trips + iterations * r.round_trips
    return min(1.0, _gpu_rate(resident, block * per_bag, trips, latency_ns) / (card.copy_tbps * 1e12))


def launched_per_sm(r) -> int:
    """The programs per multiprocessor a persistent kernel's grid launches (its PROGRAMS_PER_SM;
    the pooled short-bag forward's launcher takes one fewer for 128-wide tiles): no more of them
    are resident than that, whatever the registers would allow."""
    c = r.constexprs
    launched = c.get("PROGRAMS_PER_SM", r.blocks_per_sm)
    if r.kernel == "fwd_short" and c.get("BLOCK_D", 0) > 64:
        launched = max(1, launched - 1)
    return launched


def _zero_truncated_poisson_cdf(lam: float, k: int) -> float:
    """P(X <= k) for X Poisson(lam) given X >= 1: a touched row's contributions."""
    below = sum(math.exp(-lam) * lam ** i / math.factorial(i) for i in range(k + 1))
    return (below - math.exp(-lam)) / (1 - math.exp(-lam))


def _expected_steps(lam: float, runs: int, unroll: int) -> float:
    """E[ceil(longest / unroll)] over a tile of ``runs`` runs: the run loop's iterations."""
    total, k = 0.0, 1
    while True:
        p = 1 - _zero_truncated_poisson_cdf(lam, (k - 1) * unroll) ** runs  # P(steps >= k)
        total += p
        if p < 1e-9 or k > 64:
            return total
        k += 1


# The index work around the fused step (ops/runs_triton.sorted_runs since kernels/run_index.py): per
# contribution (one id of one bag), the bytes each launch reads and writes, at copy bandwidth, plus a
# fixed gap per launch. Our byte count, not a measurement: listing the contributions 28 B (id, offsets;
# row, feature, bag), the sort by row ~100 B (32-bit keys and 64-bit indices, four radix passes),
# run_marks 64 B (sorted rows and order, feature, bag, offsets; starts, feature, gradient offset, scale),
# two cumsums 24 B each, run_layout 48 B, long_marks 20 B, long_layout 28 B.
GLUE_BYTES_PER_CONTRIBUTION = 28 + 100 + 64 + 24 + 48 + 20 + 24 + 28
GLUE_LAUNCHES = 20  # 15 torch ops + 5 kernels (docs/gpu.md), the fused step not counted
LAUNCH_GAP_US = 3.0  # the device's idle time between two dependent launches, assumed


def glue_seconds(ids_per_bag: int, card: Card) -> float:
    """The index work's estimated time over the dlrm batch (see GLUE_BYTES_PER_CONTRIBUTION)."""
    contributions = TABLES * BATCH * ids_per_bag
    return contributions * GLUE_BYTES_PER_CONTRIBUTION / (card.copy_tbps * 1e12) + GLUE_LAUNCHES * LAUNCH_GAP_US * 1e-6


def backward(r, ids_per_bag: int, dim: int, elem_bytes: int, weighted: bool, card: Card,
             latency_ns: float) -> Dict[str, float]:
    """The fused step kernel (``r``: a ``fused`` reading) over the dlrm batch: its fraction of
    copy bandwidth, and by FBGEMM's byte formula, 2 x (4 B sum(D) + 4 B sum(D) L) over the
    kernel's time, its fraction of peak. A tile of BLOCK_U runs (touched rows) costs the tile
    loop's round trips plus the run loop's for each further step of its longest run; it reads
    each contribution's gradient row, offset (and scale), the run's indices, the row, its state,
    and writes both back. The torch glue around the kernel (the sort into runs, about half the
    backward's time by issue 27) is not counted."""
    c = r.constexprs
    block, unroll = c["BLOCK_U"], c.get("UNROLL", 1)
    lam = BATCH * ids_per_bag / ROWS  # contributions per row of a table, on average
    mean_run = lam / (1 - math.exp(-lam))
    runs = TABLES * ROWS * (1 - math.exp(-lam))
    per_run = (mean_run * (4 * dim + 8 + (4 if weighted else 0)) + 40 + 2 * dim * elem_bytes
               + STATE_BYTES[c["OPTIMIZER"]](dim))
    trips = r.tile_round_trips + (_expected_steps(lam, block, unroll) - 1) * r.round_trips
    rate = min(_gpu_rate(r.blocks_per_sm, block * per_run, trips, latency_ns), card.copy_tbps * 1e12)
    seconds = runs * per_run / rate
    formula = 2 * (4 * BATCH * TABLES * dim + 4 * BATCH * TABLES * dim * ids_per_bag)
    whole = seconds + glue_seconds(ids_per_bag, card)
    return {"copy": rate / (card.copy_tbps * 1e12), "fbgemm_peak": formula / seconds / (card.peak_tbps * 1e12),
            "us": seconds * 1e6, "whole_us": whole * 1e6,
            "whole_fbgemm_peak": formula / whole / (card.peak_tbps * 1e12)}


def _best(readings, key) -> Optional[object]:
    return max(readings, key=key, default=None)


def rows(readings: Sequence, dtype: str, dim: int, ids: str = "int64", weighted: bool = False) -> List[List[str]]:
    """One row per kernel (its best config by the estimate at 1 id per bag, H100, 900 ns): the
    kernel, the config, the round trips, then each card x latency x ids per bag."""
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    id_bytes = 8 if ids == "int64" else 4
    w = " (weighted)" if weighted else ""
    stored = (("INT8", (dim + 8 + 15) // 16 * 16), ("INT4", (dim // 2 + 4 + 15) // 16 * 16),
              ("FP16", (2 * dim + 15) // 16 * 16))
    kinds = [("pooled forward, short bags (persistent)" + w, "fwd_short", "SHORT=1", elem * dim),
             ("pooled forward, general kernel" + w, "fwd", None, elem * dim),
             ("pooled forward, VBE" + w, "fwd", "HAS_INVERSE=True", elem * dim)]
    kinds += [(f"quantized {s} forward, short bags (persistent)" + w, "quant_fwd_short", f"{s} ", b) for s, b in stored]
    kinds += [(f"quantized {s} forward, general kernel" + w, "quant_fwd", f"{s} ", b) for s, b in stored]
    # the hash tables' probe-and-gather: each id also reads its bucket's 8 int64 keys
    kinds += [("hashed tables: probe and gather" + w, "hash_probe", None, elem * dim + 64)]
    out = []
    for name, kernel, marker, row_bytes in kinds:
        # the short-bag kernels at SHORT=1 (one id per bag); the general ones as launched alone (SHORT=0)
        group = [r for r in readings if r.kernel == kernel and r.constexprs.get("SHORT", 0) == kernel.endswith("_short")
                 and (marker is None and "HAS_INVERSE=True" not in r.label or marker is not None and marker in r.label)]
        f = lambda r, n, card, lat: forward(r, n, dim, row_bytes, id_bytes, weighted, card, lat)  # noqa: E731
        best = _best(group, key=lambda r: f(r, 1, CARDS[0], LATENCIES_NS[0]))
        if best is not None:
            dead = DEAD_BLOCKS.get(best.kernel, 0)
            fill = f"{best.prologue_round_trips}" + (f"+{dead} dead blocks" if dead else "")
            extra = PIPELINE_FILL.get(best.kernel, 0)
            trips = (f"{fill} once+{best.round_trips:g}/block" if getattr(best, "persistent", False)
                     else f"{best.prologue_round_trips}+{best.round_trips:g}/it" + (f" (+{extra} it)" if extra else ""))
            cells = [f(best, n, card, lat) for card in CARDS for lat in LATENCIES_NS for n in IDS_PER_BAG]
            out.append([name, best.label, trips] + ["-" if math.isnan(x) else f"{100 * x:.0f}%" for x in cells])
    for optimizer, label in OPTIMIZERS.items():
        group = [r for r in readings if r.kernel == "fused" and r.constexprs.get("OPTIMIZER") == optimizer]
        b = lambda r, n, card, lat: backward(r, n, dim, elem, weighted, card, lat)  # noqa: E731
        best = _best(group, key=lambda r: b(r, 1, CARDS[0], LATENCIES_NS[0])["copy"])
        if best is not None:
            cells = []
            for card in CARDS:
                for lat in LATENCIES_NS:
                    for n in IDS_PER_BAG:
                        e = b(best, n, card, lat)
                        cells.append(f"{100 * e['copy']:.0f}% ({100 * e['fbgemm_peak']:.0f}%; whole "
                                     f"{100 * e['whole_fbgemm_peak']:.0f}%)")
            out.append([f"backward kernel, fused {label}", best.label,
                        f"{best.tile_round_trips:g}/tile+{best.round_trips:g}/it"] + cells)
    return out


def report(readings: Sequence, dtype: str, dim: int, ids: str = "int64", weighted: bool = False) -> str:
    header = ["kernel", "best config", "round trips"] + [f"{card.name} {lat}ns L={n}" for card in CARDS
                                                         for lat in LATENCIES_NS for n in IDS_PER_BAG]
    lines = ["# Estimated bandwidth, % of copy (backward: kernel only; in brackets FBGEMM's byte formula over",
             "# the kernel's time, % of peak, then over the whole backward's: the kernel plus the index work, by",
             "# estimate.GLUE_BYTES_PER_CONTRIBUTION). An estimate from machine code by Little's law, not a measurement:",
             f"# dlrm shape, {TABLES} tables x {ROWS} rows, {BATCH} bags, dim {dim}, {dtype} tables, {ids} ids",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(readings, dtype, dim, ids, weighted)]
    lines += [f"# {card.name}: peak {card.peak_tbps} TB/s, copy {card.copy_tbps} TB/s ({card.source})" for card in CARDS]
    return "\n".join(lines)
