"""What one benchmark configuration runs: its tables, its seeded input batches, and its bytes.

A ``Workload`` is one point of a sweep. Every provider sees the same reference weights
(:func:`reference_tables`) and the same batches (:func:`make_batches`), so their outputs can
be compared element by element and their timings side by side.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import jaggedrec as jr
from jaggedrec.quant.rowwise import row_bytes

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# row-wise quantized tables (jaggedrec.quant's layouts), each provider quantizing the same fp32
# tables its own way; inference only, so forward mode only
QUANT_DTYPES: Dict[str, jr.DataType] = {"int8": jr.DataType.INT8, "int4": jr.DataType.INT4}
MODES = ("forward", "backward", "train")
# --optimizer: the fused optimizer of train mode, by FBGEMM's EmbOptimType name in lower case
OPTIMIZERS = ("exact_sgd", "exact_rowwise_adagrad", "exact_adagrad", "adam", "lars_sgd", "partial_rowwise_adam",
              "lamb", "partial_rowwise_lamb")
MODE_LABELS = {
    "forward": "forward (inference, no_grad)",
    "backward": "forward+backward (dense grads)",
    "train": "train step (fwd+bwd+SGD lr 0.01)",
}
# Traffic per step, in units of (gathered row bytes R, pooled output bytes O); see bytes_per_step.
_TRAFFIC = {"forward": (1, 1), "backward": (2, 2), "train": (3, 2)}


@dataclass(frozen=True)
class Workload:
    """One configuration. Tables are all SUM-pooled; table ``t`` serves feature ``f{t}``.

    ``dims`` is cycled over the tables, so ``(64,)`` gives every table dim 64 and
    ``(4, 16, 64)`` gives 4, 16, 64, 4, 16, ... ``bag_size`` is ``"fixed"`` (every bag holds
    ``round(pooling_factor)`` ids, e.g. one-hot DLRM features) or ``"random"`` (uniform in
    ``[0, 2 * pooling_factor]``, so the mean is the pooling factor and some bags are empty).

    ``dtype`` is a float dtype (``DTYPES``) or a quantized one (``QUANT_DTYPES``, forward mode
    only), whose reference tables are fp32.

    ``vbe_users > 0`` makes feature ``f0`` a user feature: the batch's samples come from
    ``vbe_users`` distinct users (each at least once), and a sample's ``f0`` bag is its user's.
    Every batch then also holds the deduplicated form (:class:`VbeBatch`), one ``f0`` bag per
    user, that a variable-batch (VBE) KJT carries.
    """

    tables: int = 26
    num_embeddings: int = 100_000
    dims: Tuple[int, ...] = (64,)
    batch_size: int = 4096
    pooling_factor: float = 1.0
    bag_size: str = "fixed"
    distribution: str = "uniform"
    zipf_alpha: float = 1.1
    dtype: str = "fp32"
    weighted: bool = False
    mode: str = "forward"
    device: str = "cpu"
    vbe_users: int = 0
    busy: int = 0  # busy processes running beside the timed steps (contention.py)
    optimizer: str = "exact_sgd"  # train mode's fused optimizer (OPTIMIZERS)

    def __post_init__(self) -> None:
        if not 0 <= self.vbe_users <= self.batch_size:
            raise ValueError(f"vbe_users must be in [0, batch_size={self.batch_size}], got {self.vbe_users}")
        if self.busy < 0:
            raise ValueError(f"busy must be >= 0 processes, got {self.busy}")
        if self.tables <= 0 or self.num_embeddings <= 0 or self.batch_size <= 0 or not self.dims:
            raise ValueError(f"tables, num_embeddings, batch_size and dims must be positive: {self}")
        if self.pooling_factor < 0:
            raise ValueError(f"pooling_factor must be >= 0, got {self.pooling_factor}")
        for field, allowed in (("bag_size", ("fixed", "random")), ("distribution", ("uniform", "zipf")),
                               ("dtype", (*DTYPES, *QUANT_DTYPES)), ("mode", MODES), ("device", ("cpu", "cuda")),
                               ("optimizer", OPTIMIZERS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.quantized and self.mode != "forward":
            raise ValueError(f"{self.dtype} tables are for inference: mode must be forward, got {self.mode!r}")
        if self.distribution == "zipf" and self.zipf_alpha <= 0:
            raise ValueError(f"zipf_alpha must be positive, got {self.zipf_alpha}")

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)

    @property
    def table_dims(self) -> List[int]:
        return [self.dims[t % len(self.dims)] for t in range(self.tables)]

    @property
    def total_dim(self) -> int:
        return sum(self.table_dims)

    @property
    def keys(self) -> List[str]:
        return [f"f{t}" for t in range(self.tables)]

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        """The reference tables' dtype: fp32 for quantized tables (what gets quantized)."""
        return torch.float32 if self.quantized else DTYPES[self.dtype]

    def table_configs(self) -> List[jr.EmbeddingBagConfig]:
        """The float tables (fp32 for quantized ones, which are built from these)."""
        data_type = {torch.float32: jr.DataType.FP32, torch.float16: jr.DataType.FP16,
                     torch.bfloat16: jr.DataType.BF16}[self.torch_dtype]
        return [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=d, num_embeddings=self.num_embeddings,
                                      feature_names=[f"f{t}"], data_type=data_type)
                for t, d in enumerate(self.table_dims)]

    def describe(self) -> str:
        dims = str(self.dims[0]) if len(self.dims) == 1 else "[" + ",".join(map(str, self.dims)) + "]"
        bags = f"{self.pooling_factor:g} ids/bag ({self.bag_size})"
        ids = "uniform ids" if self.distribution == "uniform" else f"zipf({self.zipf_alpha:g}) ids"
        vbe = f", f0 from {self.vbe_users} users (VBE)" if self.vbe_users else ""
        busy = f", beside {self.busy} busy process{'es' if self.busy > 1 else ''}" if self.busy else ""
        return (f"{self.tables} tables x {self.num_embeddings:,} rows, dim {dims}, {self.dtype}, "
                f"batch {self.batch_size}, {bags}, {ids}{', weighted' if self.weighted else ''}{vbe}, "
                f"{self._mode_label()}, {self.device}{busy}")

    def _mode_label(self) -> str:
        if self.mode == "train" and self.optimizer != "exact_sgd":  # the fused step's optimizer, not SGD
            return f"train step (fwd+bwd+{self.optimizer.upper()} lr 0.01)"
        return MODE_LABELS[self.mode]

    def as_dict(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["dims"] = list(self.dims)
        return out


@dataclass
class VbeBatch:
    """A batch with feature ``f0`` deduplicated: one bag per user, and each sample's user.

    Attributes:
        values, lengths, weights: as in :class:`Batch`, but ``f0`` has ``vbe_users`` bags.
        inverse_indices: ``[T, B]`` int64, each sample's bag of each feature (``f0``: its
            user; the others: the sample itself).
    """

    values: torch.Tensor
    lengths: torch.Tensor
    weights: Optional[torch.Tensor]
    inverse_indices: torch.Tensor
    stride_per_key: List[int]

    def jaggedrec_kjt(self, keys: List[str]) -> jr.KeyedJaggedTensor:
        return jr.KeyedJaggedTensor(keys, self.values, self.weights, lengths=self.lengths,
                                    stride_per_key_per_rank=[[b] for b in self.stride_per_key],
                                    inverse_indices=(keys, self.inverse_indices))


@dataclass
class Batch:
    """One input batch in the KJT's key-major layout, plus what the timing needs.

    Attributes:
        values: ``[N]`` int64 ids, all of ``f0``, then all of ``f1``, ...
        lengths: ``[T*B]`` int64 ids per (feature, sample).
        offsets: ``[T*B+1]`` int64 bag starts.
        weights: ``[N]`` fp32 per-id weights, or None.
        key_counts: ``[T]`` int64 ids per feature, on the device.
        key_offsets: ``T+1`` host ints, first id of each feature (what a data loader knows).
        grad_out: ``[B, total_dim]`` fp32 upstream gradient for backward/train modes, or None.
        vbe: the same batch with ``f0`` deduplicated (``vbe_users > 0``), or None.
    """

    values: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    weights: Optional[torch.Tensor]
    key_counts: torch.Tensor
    key_offsets: List[int]
    grad_out: Optional[torch.Tensor]
    vbe: Optional[VbeBatch] = None

    @property
    def ids_per_feature(self) -> List[int]:
        return [b - a for a, b in zip(self.key_offsets[:-1], self.key_offsets[1:])]

    def jaggedrec_kjt(self, keys: List[str]) -> jr.KeyedJaggedTensor:
        """A fresh KJT over the batch's tensors (no copy), as a data loader hands one per step."""
        return jr.KeyedJaggedTensor(keys, self.values, self.weights, lengths=self.lengths, offsets=self.offsets)


@functools.lru_cache(maxsize=8)
def _zipf_cdf(rows: int, alpha: float) -> torch.Tensor:
    """``[rows]`` float64 CDF of P(rank k) proportional to 1/(k+1)^alpha."""
    cdf = torch.arange(1, rows + 1, dtype=torch.float64).pow(-alpha).cumsum(0)
    return cdf / cdf[-1]


def _draw_ids(w: Workload, n: int, gen: torch.Generator, hot_order: Optional[torch.Tensor]) -> torch.Tensor:
    if w.distribution == "uniform":
        return torch.randint(0, w.num_embeddings, (n,), generator=gen)
    ranks = torch.searchsorted(_zipf_cdf(w.num_embeddings, w.zipf_alpha), torch.rand(n, generator=gen,
                                                                                      dtype=torch.float64))
    # rank -> row through a per-table permutation: hot rows are scattered, not rows 0, 1, 2, ...
    return hot_order[ranks.clamp_(max=w.num_embeddings - 1)]


def _draw_lengths(w: Workload, gen: torch.Generator) -> torch.Tensor:
    if w.bag_size == "fixed":
        return torch.full((w.batch_size,), round(w.pooling_factor), dtype=torch.int64)
    # uniform over {0, ..., floor(2L)}: mean L for integer L, and empty bags occur
    return (torch.rand(w.batch_size, generator=gen) * (int(2 * w.pooling_factor) + 1)).long()


def make_batches(w: Workload, count: int, seed: int = 0) -> List[Batch]:
    """``count`` distinct batches, drawn on the CPU from ``seed`` and moved to ``w.device``."""
    gen = torch.Generator().manual_seed(seed)
    hot_orders = ([torch.randperm(w.num_embeddings, generator=gen) for _ in range(w.tables)]
                  if w.distribution == "zipf" else [None] * w.tables)
    to = functools.partial(_to, device=w.device)
    batches = []
    for _ in range(count):
        lengths = [_draw_lengths(w, gen) for _ in range(w.tables)]
        ids = [_draw_ids(w, int(n.sum()), gen, hot_orders[t]) for t, n in enumerate(lengths)]
        weights = [torch.rand(x.numel(), generator=gen) for x in ids] if w.weighted else None
        vbe = None
        if w.vbe_users:
            vbe, lengths[0], ids[0], f0_weights = _deduplicate_first_feature(w, lengths, ids, weights, gen)
            vbe = VbeBatch(to(vbe.values), to(vbe.lengths), to(vbe.weights), to(vbe.inverse_indices),
                           vbe.stride_per_key)
            if weights is not None:
                weights[0] = f0_weights
        counts = [x.numel() for x in ids]
        key_offsets = [0]
        for c in counts:
            key_offsets.append(key_offsets[-1] + c)
        lengths_t = torch.cat(lengths)
        grad_out = torch.randn(w.batch_size, w.total_dim, generator=gen) if w.mode != "forward" else None
        batches.append(Batch(values=to(torch.cat(ids)), lengths=to(lengths_t),
                             offsets=to(torch.nn.functional.pad(lengths_t.cumsum(0), (1, 0))),
                             weights=to(None if weights is None else torch.cat(weights)),
                             key_counts=to(torch.tensor(counts)), key_offsets=key_offsets,
                             grad_out=to(grad_out), vbe=vbe))
    return batches


def _deduplicate_first_feature(w: Workload, lengths: List[torch.Tensor], ids: List[torch.Tensor],
                               weights: Optional[List[torch.Tensor]], gen: torch.Generator):
    """``f0``'s first ``vbe_users`` drawn bags become the users' bags, and each sample is given
    a user (each user at least once). Returns the VBE batch (on the CPU), and ``f0``'s lengths,
    ids and weights expanded to the full batch."""
    users = w.vbe_users
    user_lengths = lengths[0][:users]
    user_ids = ids[0][:int(user_lengths.sum())]
    user_weights = None if weights is None else weights[0][:user_ids.numel()]
    inverse = torch.cat([torch.arange(users), torch.randint(0, users, (w.batch_size - users,), generator=gen)])
    inverse = inverse[torch.randperm(w.batch_size, generator=gen)]
    # ids of the expanded f0: each sample's user's bag, in sample order
    starts = torch.nn.functional.pad(user_lengths.cumsum(0), (1, 0))
    sample_lengths = user_lengths[inverse]
    within = torch.arange(int(sample_lengths.sum())) - torch.repeat_interleave(
        torch.nn.functional.pad(sample_lengths.cumsum(0), (1, 0))[:-1], sample_lengths)
    take = torch.repeat_interleave(starts[:-1][inverse], sample_lengths) + within
    samples = torch.arange(w.batch_size)
    vbe = VbeBatch(values=torch.cat([user_ids] + ids[1:]), lengths=torch.cat([user_lengths] + lengths[1:]),
                   weights=None if weights is None else torch.cat([user_weights] + weights[1:]),
                   inverse_indices=torch.stack([inverse] + [samples] * (w.tables - 1)),
                   stride_per_key=[users] + [w.batch_size] * (w.tables - 1))
    return vbe, sample_lengths, user_ids[take], None if weights is None else user_weights[take]


def _to(t: Optional[torch.Tensor], device: str) -> Optional[torch.Tensor]:
    return None if t is None else t.to(device)


def reference_tables(w: Workload, seed: int = 0) -> List[torch.Tensor]:
    """One ``[rows, dim]`` table per feature, uniform in +-sqrt(1/rows) as TorchRec initialises.

    Drawn from ``seed`` on the device itself (CUDA tables of many GB would take long to draw
    on the CPU), so the numbers differ between devices but not between runs or providers.
    """
    gen = torch.Generator(device=w.device).manual_seed(seed + 1)
    bound = (1.0 / w.num_embeddings) ** 0.5
    return [torch.empty(w.num_embeddings, d, device=w.device).uniform_(-bound, bound, generator=gen)
            .to(w.torch_dtype) for d in w.table_dims]


def _row_bytes(w: Workload, dim: int) -> int:
    if w.quantized:
        return row_bytes(QUANT_DTYPES[w.dtype], dim, row_align=1)
    return dim * torch.empty(0, dtype=w.torch_dtype).element_size()


def bytes_per_step(w: Workload, ids_per_feature: Sequence[int]) -> int:
    """Bytes one step moves, by FBGEMM's benchmark convention.

    ``R = sum_f ids_f * dim_f * elsize`` (table rows gathered, in the table dtype; for
    quantized tables a row's bytes at ``row_align`` 1, codes plus scale and bias) and
    ``O = B * total_dim * 4`` (the fp32 pooled output). Ids, offsets and per-sample weights
    are not counted. Per mode:

    - forward: ``R + O`` (read the rows, write the output);
    - backward: ``2R + 2O`` (the forward, then read the output gradient and write one row
      gradient per id);
    - train: ``3R + 2O`` (the forward, then read the output gradient, and read and write
      each gathered row to apply the update).

    Dense-gradient providers move more than this (they also clear and write the whole
    gradient); GB/s counts only the bytes the work needs, so it rewards not doing that.
    """
    if len(ids_per_feature) != w.tables:
        raise ValueError(f"need one id count per table ({w.tables}), got {len(ids_per_feature)}")
    rows = sum(n * _row_bytes(w, d) for n, d in zip(ids_per_feature, w.table_dims))
    out = w.batch_size * w.total_dim * 4
    r, o = _TRAFFIC[w.mode]
    return r * rows + o * out


# --- the unpooled EmbeddingCollection (``--module ec``) ---------------------------------------

# Traffic per step of an unpooled lookup, in units of R (bytes of the rows gathered, in the
# table dtype). The output is one row per id, so its bytes are R too; see ec_bytes_per_step.
_EC_TRAFFIC = {"forward": 2, "backward": 4, "train": 5}


@dataclass
class EcBatch(Batch):
    """A :class:`Batch` for the unpooled lookup, whose upstream gradient is one row per id.

    Attributes (beyond :class:`Batch`'s; ``grad_out`` changes shape):
        grad_out: ``[sum_f N_f * dim_f]`` gradient of every feature's rows, flattened and
            concatenated in key order, in the table dtype; None in forward mode.
        grads: per feature, the ``[N_f, dim_f]`` view of ``grad_out`` for that feature's rows;
            None in forward mode.
    """

    grads: Optional[List[torch.Tensor]] = None


def make_ec_batches(w: Workload, count: int, seed: int = 0) -> List[EcBatch]:
    """``count`` batches for the unpooled lookup: the ids and lengths of :func:`make_batches`
    (drawn as in forward mode, so every mode of one configuration sees the same ids), plus an
    upstream gradient row per id when ``w.mode`` needs one."""
    batches = make_batches(w.replace(mode="forward"), count, seed)
    gen = torch.Generator().manual_seed(seed + 7)  # the gradients' own stream: the ids stay as drawn
    out = []
    for b in batches:
        grad_out = grads = None
        if w.mode != "forward":
            sizes = [n * d for n, d in zip(b.ids_per_feature, w.table_dims)]
            grad_out = torch.randn(sum(sizes), generator=gen).to(device=w.device, dtype=w.torch_dtype)
            grads = [g.view(n, d) for g, n, d in zip(grad_out.split(sizes), b.ids_per_feature, w.table_dims)]
        fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(Batch)}
        out.append(EcBatch(**dict(fields, grad_out=grad_out), grads=grads))
    return out


def ec_bytes_per_step(w: Workload, ids_per_feature: Sequence[int]) -> int:
    """Bytes one step of the unpooled lookup moves: :func:`bytes_per_step`'s convention with
    the pooled output replaced by one output row per id, in the table dtype.

    ``R = sum_f ids_f * dim_f * elsize`` (rows gathered), and the output is ``R`` bytes too:

    - forward: ``2R`` (read the rows, write them out);
    - backward: ``4R`` (the forward, then read the output gradient and write one row
      gradient per id);
    - train: ``5R`` (the forward, then read the output gradient, and read and write each
      gathered row to apply the update).

    Ids and lengths are not counted, nor the fp32 upcast a provider may write for fp16 tables.
    """
    if len(ids_per_feature) != w.tables:
        raise ValueError(f"need one id count per table ({w.tables}), got {len(ids_per_feature)}")
    elsize = torch.empty(0, dtype=w.torch_dtype).element_size()
    rows = sum(n * d * elsize for n, d in zip(ids_per_feature, w.table_dims))
    return _EC_TRAFFIC[w.mode] * rows
