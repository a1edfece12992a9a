"""Hypothesis strategies for ``test_properties.py``: table collections and KJTs.

Everything is drawn as plain Python data (table specs, bags of ids, per-id weights, and how
the tensors are laid out), so that a failing example prints as something one can read and
rebuild by hand. ``BatchSpec.kjt`` then builds the tensors: ids and weights as contiguous
tensors, as a column of an ``[n, 3]`` tensor, as every other element of a larger buffer, or
(where every element is equal) as one element expanded to stride 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hypothesis import strategies as st

import jaggedrec as jr

TORCH_DTYPES = {jr.DataType.FP32: torch.float32, jr.DataType.FP16: torch.float16, jr.DataType.BF16: torch.bfloat16}
FEATURES = ("a", "b", "c", "d", "e")
EXTRA_KEYS = ("x_unread", "y_unread")  # keys in the KJT that no table reads
EXTRA_ROWS = 1000                      # their ids may be far past any table's rows
TABLE_NAMES = ("t_user", "t_item", "t_ad", "t_query", "t_geo")
LAYOUTS = ("contiguous", "column", "every_other")


@dataclass(frozen=True)
class TableSpec:
    name: str
    dim: int
    rows: int
    pooling: jr.PoolingType
    data_type: jr.DataType
    features: Tuple[str, ...]


@dataclass(frozen=True)
class CollectionSpec:
    tables: Tuple[TableSpec, ...]
    weighted: bool
    seed: int      # of the table contents and the output gradient
    scale: float   # table rows are randn * scale

    def configs(self) -> List[jr.EmbeddingBagConfig]:
        return [jr.EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                      feature_names=list(t.features), pooling=t.pooling, data_type=t.data_type)
                for t in self.tables]

    def key_rows(self) -> Dict[str, int]:
        """Each read key's id bound: the rows of the smallest table that reads it."""
        rows: Dict[str, int] = {}
        for t in self.tables:
            for f in t.features:
                rows[f] = min(rows.get(f, t.rows), t.rows)
        return rows

    def readers(self, feature: str) -> int:
        return sum(feature in t.features for t in self.tables)

    def output_keys(self) -> List[str]:
        """TorchRec's order: tables in config order, then each table's features; a feature
        read by several tables is named ``feature@table``."""
        return [f"{f}@{t.name}" if self.readers(f) > 1 else f for t in self.tables for f in t.features]


@st.composite
def collections(draw, max_tables: int = 4, dims: Sequence[int] = (1, 2, 3, 4, 7, 8, 16, 33, 64, 130),
                max_rows: int = 1000, data_types: Sequence[jr.DataType] = tuple(TORCH_DTYPES),
                max_features: int = 3, weighted: Optional[bool] = None,
                scales: Sequence[float] = (1.0,)) -> CollectionSpec:
    """Tables of mixed dims, rows, poolings and dtypes; features drawn from a small pool, so
    that a feature read by two tables is common."""
    n = draw(st.integers(1, max_tables))
    names = draw(st.permutations(TABLE_NAMES))[:n]  # not sorted: output order must follow the configs
    pool = FEATURES[:n + 1]
    tables = []
    for name in names:
        # small tables often, so that ids repeat; up to max_rows otherwise
        rows = draw(st.one_of(st.integers(1, 6), st.integers(1, max_rows)))
        tables.append(TableSpec(
            name=name, dim=draw(st.sampled_from(dims)), rows=rows,
            pooling=draw(st.sampled_from([jr.PoolingType.SUM, jr.PoolingType.MEAN])),
            data_type=draw(st.sampled_from(data_types)),
            features=tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=max_features, unique=True)))))
    return CollectionSpec(tuple(tables), draw(st.booleans()) if weighted is None else weighted,
                          draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(scales)))


@dataclass
class BatchSpec:
    """A KJT as plain data: ``bags[key]`` holds B bags of ids, ``weights[key]`` their weights."""

    keys: Tuple[str, ...]
    batch: int
    bags: Dict[str, Tuple[Tuple[int, ...], ...]]
    weights: Optional[Dict[str, Tuple[Tuple[float, ...], ...]]]
    id_dtype: torch.dtype
    lengths_dtype: torch.dtype
    offsets_dtype: torch.dtype
    given: str                 # "lengths", "offsets" or "both"
    layouts: Dict[str, str]    # "values", "lengths", "offsets", "weights" -> a LAYOUTS entry or "expanded"

    def ids(self) -> List[int]:
        return [i for k in self.keys for bag in self.bags[k] for i in bag]

    def lengths(self) -> List[int]:
        return [len(bag) for k in self.keys for bag in self.bags[k]]

    def flat_weights(self) -> List[float]:
        return [w for k in self.keys for bag in self.weights[k] for w in bag]

    def key_slices(self) -> Dict[str, slice]:
        """Where each key's ids sit in ``values``."""
        out, start = {}, 0
        for k in self.keys:
            n = sum(len(bag) for bag in self.bags[k])
            out[k] = slice(start, start + n)
            start += n
        return out

    def kjt(self, expanded_storage: str = "one", device: str = "cpu") -> jr.KeyedJaggedTensor:
        """Build the KJT on ``device`` (built there, not moved: a move would copy the strided
        tensors contiguous). ``expanded_storage="one"`` expands a one-element tensor (as
        ``torch.tensor([2]).expand(n)``); ``"padded"`` expands the first element of an
        n-element buffer whose other elements differ, so that a kernel that ignores the
        stride reads wrong numbers that are still inside the allocation."""
        lengths = torch.tensor(self.lengths(), dtype=torch.int64, device=device)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        values = torch.tensor(self.ids(), dtype=torch.int64, device=device).to(self.id_dtype)
        # Garbage beside ids and offsets repeats their own numbers: ids that stay ids (those of
        # unread keys may still be out of a table's range: the kernels' bounds check reports
        # them) and offsets that stay non-decreasing and within [0, N]. Behind an expanded id
        # the garbage is a neighbouring id, which a misread would pool instead.
        kw = dict(expanded_storage=expanded_storage)
        values = lay_out(values, self.layouts["values"],
                         garbage=values ^ 1 if self.layouts["values"] == "expanded" else values, **kw)
        weights = None
        if self.weights is not None:
            w = torch.tensor(self.flat_weights(), dtype=torch.float32, device=device)
            weights = lay_out(w, self.layouts["weights"], garbage=torch.full_like(w, 7.0), **kw)
        given_lengths = given_offsets = None
        if self.given in ("lengths", "both"):
            lt = lengths.to(self.lengths_dtype)
            given_lengths = lay_out(lt, self.layouts["lengths"], garbage=lt, **kw)
        if self.given in ("offsets", "both"):
            ot = offsets.to(self.offsets_dtype)
            given_offsets = lay_out(ot, self.layouts["offsets"], garbage=ot, **kw)
        return jr.KeyedJaggedTensor(list(self.keys), values, weights, lengths=given_lengths, offsets=given_offsets)


def batch_spec(keys: Sequence[str], bags: Dict[str, Sequence[Sequence[int]]],
               weights: Optional[Dict[str, Sequence[Sequence[float]]]] = None, given: str = "lengths",
               **layouts: str) -> BatchSpec:
    """A BatchSpec written by hand (for ``@example``): int64 tensors, contiguous unless said."""
    batch = len(next(iter(bags.values())))
    freeze = lambda d: None if d is None else {k: tuple(tuple(b) for b in v) for k, v in d.items()}  # noqa: E731
    names = ["values", "lengths", "offsets"] + (["weights"] if weights is not None else [])
    return BatchSpec(tuple(keys), batch, freeze(bags), freeze(weights), torch.int64, torch.int64, torch.int64,
                     given, {n: layouts.get(n, "contiguous") for n in names})


def lay_out(t: torch.Tensor, layout: str, garbage: torch.Tensor, expanded_storage: str = "one") -> torch.Tensor:
    """``t`` ([n]) with the same elements, laid out in memory as ``layout`` says."""
    n = t.numel()
    if layout == "contiguous":
        return t.clone()
    if layout == "column":  # column 1 of an [n, 3] tensor: stride 3, storage offset 1
        return torch.stack([garbage, t, garbage], dim=1)[:, 1]
    if layout == "every_other":  # stride 2 in a [2n] buffer
        return torch.stack([t, garbage], dim=1).reshape(-1)[::2]
    if layout == "expanded":  # stride 0: every element is t[0]
        assert n >= 1 and bool((t == t[0]).all()), "expanded needs equal elements"
        if expanded_storage == "one":
            return t[:1].clone().expand(n)
        base = torch.cat([t[:1], garbage[1:]])
        return base[:1].expand(n)
    raise ValueError(layout)


def _simple_first(sizes: range) -> List[int]:
    """Sizes in the order hypothesis should prefer and shrink to: 1, 2, then 0, then the rest."""
    return sorted(sizes, key=lambda n: {1: 0, 2: 1, 0: 2}.get(n, n))


# True one time in four (integers(0, 3) == 0 would lean towards True: hypothesis favours 0)
_ONE_IN_4 = st.sampled_from([False, False, False, True])

_WEIGHTS = st.one_of(st.sampled_from([1.0, 0.5, -1.25, 2.0, 0.0]),
                     st.floats(-2.0, 2.0, width=32, allow_subnormal=False))


@st.composite
def batches(draw, coll: CollectionSpec, max_batch: int = 6, max_len: int = 4, max_extra_keys: int = 2,
            layouts: Sequence[str] = LAYOUTS, index_dtypes: Sequence[torch.dtype] = (torch.int64, torch.int32),
            min_batch: int = 0) -> BatchSpec:
    """A KJT for ``coll``: keys shuffled, with extra keys no table reads; empty bags, keys with
    no ids, ids from a narrow range (duplicates) or from the whole table."""
    rows = dict(coll.key_rows())
    extra = list(EXTRA_KEYS[:draw(st.integers(0, max_extra_keys))])
    rows.update({k: EXTRA_ROWS for k in extra})
    keys = tuple(draw(st.permutations(sorted(coll.key_rows()) + extra)))
    # B=0 (nothing to pool) one time in ten: drawn with the rest, it took a third of the examples
    empty_batch = min_batch == 0 and (max_batch == 0 or draw(st.sampled_from([False] * 9 + [True])))
    batch = 0 if empty_batch else draw(st.sampled_from(_simple_first(range(max(1, min_batch), max_batch + 1))))
    # every bag of one length (lengths may then be a stride-0 tensor), and maybe one id for all
    uniform = draw(_ONE_IN_4)
    same_len = draw(st.sampled_from(_simple_first(range(max_len + 1)))) if uniform else None
    same_id = draw(st.integers(0, min(rows.values()) - 1)) if uniform and draw(st.booleans()) else None
    bags, weights = {}, ({} if coll.weighted else None)
    same_weight = draw(_WEIGHTS.filter(lambda w: w != 0)) if coll.weighted and draw(st.booleans()) else None
    for key in keys:
        r = rows[key]
        no_ids = not uniform and draw(_ONE_IN_4)
        span = {"one": 1, "few": min(3, r), "all": r}[draw(st.sampled_from(["one", "few", "all"]))]
        low = draw(st.integers(0, r - span))
        key_bags = []
        for _ in range(batch):
            n = same_len if uniform else (0 if no_ids else draw(st.sampled_from(_simple_first(range(max_len + 1)))))
            if same_id is not None:
                key_bags.append((same_id,) * n)
            else:
                key_bags.append(tuple(draw(st.lists(st.integers(low, low + span - 1), min_size=n, max_size=n))))
        bags[key] = tuple(key_bags)
        if weights is not None:
            weights[key] = tuple(((same_weight,) * len(b)) if same_weight is not None
                                 else tuple(draw(st.lists(_WEIGHTS, min_size=len(b), max_size=len(b))))
                                 for b in key_bags)
    spec = BatchSpec(keys, batch, bags, weights, id_dtype=draw(st.sampled_from(index_dtypes)),
                     lengths_dtype=draw(st.sampled_from(index_dtypes)),
                     offsets_dtype=draw(st.sampled_from(index_dtypes)),
                     given=draw(st.sampled_from(["lengths", "offsets", "both"])), layouts={})
    if weights is not None:
        flat = spec.flat_weights()
        if flat and not any(flat):  # weights must not be all zeros: put a 1 on the first id
            k = next(k for k in keys if any(weights[k]))
            b = next(i for i, bag in enumerate(weights[k]) if bag)
            weights[k] = weights[k][:b] + ((1.0,) + weights[k][b][1:],) + weights[k][b + 1:]
    ids, lengths = spec.ids(), spec.lengths()

    def layout_for(elements: list) -> str:
        equal = len(elements) >= 1 and all(e == elements[0] for e in elements)
        return draw(st.sampled_from(list(layouts) + (["expanded"] if equal else [])))

    spec.layouts = {"values": layout_for(ids), "lengths": layout_for(lengths),
                    # offsets are non-decreasing: stride 0 only when every bag is empty
                    "offsets": layout_for([0] * (len(lengths) + 1) if not ids else [0, 1])}
    if weights is not None:
        spec.layouts["weights"] = layout_for(spec.flat_weights())
    return spec
