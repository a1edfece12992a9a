"""A plain-Python simulator of jaggedrec's hash tables (the rules in
``jaggedrec/ops/hash_probe_torch.py``'s docstring), one id at a time, with dicts and lists:
the oracle of tests/test_hash_table_properties.py and test_hash_table_equivalence.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

M64 = (1 << 64) - 1
EMPTY = -(1 << 63)


def mix(x: int) -> int:
    """splitmix64's finaliser, on unsigned 64-bit ints."""
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


@dataclass
class SimTable:
    num_embeddings: int
    bucket_size: int
    eviction: str = "lru"
    ttl: int = 0
    admit_threshold: int = 1
    sketch_width: int = 0
    # per bucket, per slot: None or [id, last_step, count]
    buckets: List[List[Optional[list]]] = field(default_factory=list)
    sketch: Dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self.num_buckets = (self.num_embeddings - 1) // self.bucket_size
        self.width = self.sketch_width or 4 * self.num_embeddings
        self.buckets = [[None] * self.bucket_size for _ in range(self.num_buckets)]

    def bucket(self, i: int) -> int:
        return ((mix(i) & 0xFFFFFFFF) * self.num_buckets) >> 32  # the low 32 bits scaled to the buckets

    def row_of(self, i: int) -> Optional[int]:
        b = self.bucket(i)
        for s, slot in enumerate(self.buckets[b]):
            if slot is not None and slot[0] == i:
                return b * self.bucket_size + s
        return None

    def live(self) -> Dict[int, int]:
        """id -> row of every live id."""
        return {slot[0]: b * self.bucket_size + s for b, bucket in enumerate(self.buckets)
                for s, slot in enumerate(bucket) if slot is not None}


class Simulator:
    """Tables by name; ``batch`` takes ``[(table or None, id)]`` per position, returns each
    position's row (None where not hashed), the evictions ``[(table, row, old id)]`` and the
    per-position flags 'unplaced' / 'pending'."""

    def __init__(self, tables: Dict[str, SimTable]):
        self.tables = tables
        self.step = 0

    def batch(self, positions: List[Tuple[Optional[str], int]], training: bool = True):
        fallback = {name: t.num_embeddings - 1 for name, t in self.tables.items()}
        if not training:
            rows = []
            for name, i in positions:
                if name is None:
                    rows.append(None)
                    continue
                r = self.tables[name].row_of(i)
                rows.append(fallback[name] if r is None else r)
            return rows, [], [None] * len(positions)
        self.step += 1
        step = self.step
        found: Dict[Tuple[str, int], int] = {}
        protected = set()
        for name, i in positions:
            if name is None:
                continue
            r = self.tables[name].row_of(i)
            if r is not None:
                found[(name, i)] = r
                protected.add((name, r))
        # admission counters: every occurrence of a missing id, then the check
        for name, i in positions:
            t = self.tables.get(name)
            if t is not None and (name, i) not in found and t.admit_threshold > 1:
                k = ((mix(i) >> 32) & 0xFFFFFFFF) % t.width
                t.sketch[k] = t.sketch.get(k, 0) + 1
        admitted = {}
        for name, i in positions:
            t = self.tables.get(name)
            if t is None or (name, i) in found or i == EMPTY:
                continue
            k = ((mix(i) >> 32) & 0xFFFFFFFF) % t.width
            if t.admit_threshold <= 1 or t.sketch.get(k, 0) >= t.admit_threshold:
                admitted.setdefault((name, t.bucket(i)), set()).add(i)
        evictions, placed = [], {}
        for (name, b), new_ids in sorted(admitted.items()):
            t = self.tables[name]
            slots = t.buckets[b]
            free = [s for s in range(t.bucket_size) if slots[s] is None]
            victims = []
            for s in range(t.bucket_size):
                slot = slots[s]
                if slot is None or (name, b * t.bucket_size + s) in protected:
                    continue
                last, count = slot[1], slot[2]
                if t.eviction == "lru":
                    victims.append(((last,), s))
                elif t.eviction == "lfu":
                    victims.append(((min(count, 1 << 30), last), s))
                elif t.eviction == "ttl" and step - last > t.ttl:
                    victims.append(((last,), s))
            ranking = free + [s for _, s in sorted(victims)]
            for i, s in zip(sorted(new_ids), ranking):
                if slots[s] is not None:
                    evictions.append((name, b * t.bucket_size + s, slots[s][0]))
                slots[s] = [i, step, 0]
                placed[(name, i)] = b * t.bucket_size + s
        rows, flags = [], []
        for name, i in positions:
            if name is None:
                rows.append(None)
                flags.append(None)
                continue
            r = found.get((name, i), placed.get((name, i)))
            t = self.tables[name]
            if r is None:
                rows.append(fallback[name])
                admitted_here = i in admitted.get((name, t.bucket(i)), ())
                flags.append("unplaced" if admitted_here else "pending")
                continue
            slot = t.buckets[r // t.bucket_size][r % t.bucket_size]
            slot[1] = step
            slot[2] += 1
            rows.append(r)
            flags.append(None)
        return rows, evictions, flags
