"""Property tests: EmbeddingBagCollection on random tables and KJTs against a float64 reference.

The reference here is our own, built per table and feature from ``F.embedding_bag`` over a
float64 copy of the table's stored rows; it shares no code with jaggedrec's ops or with
``jr_testing``. Tolerances are bounds on rounding error, relative to the *magnitude* of each
result (the same computation over absolute values), so cancellation cannot make them flaky:

* forward and per-id-weight gradients: the stored rows (fp16/bf16 ones too) are exact in
  fp32, and the module must sum in fp32, so fp32 rounding only (rtol 1e-5), for every dtype;
* table gradients and updated rows, which are stored in the table's dtype: that dtype's
  rounding (fp32 1e-5, fp16 2e-3, bf16 1.6e-2).

Two lanes: the torch path (``backend="torch"``, a few hundred examples), and the Triton
kernels under the interpreter (``backend="triton"``, marked ``interpret``; tiny examples).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jaggedrec as jr
from jaggedrec import optim
from property_strategies import TORCH_DTYPES, BatchSpec, CollectionSpec, TableSpec, batch_spec, batches, collections

FWD_RTOL = 1e-5   # fp32 accumulation of rows that are exact in fp32
ATOL = 1e-6
STORED_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRITON = pytest.param("triton", marks=pytest.mark.interpret)
# the Triton lane runs compiled on a GPU where there is one, else interpreted on the CPU
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the Triton lane: tiny problems, the interpreter costs ~1 ms per program
TRITON_DIMS = (1, 2, 3, 4, 7, 8, 16, 1, 3, 7, 130)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: a second intra-op thread only waits, and on a loaded 2-core
    machine each parallel region stalls on it (the file ran 5x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the reference ------------------------------------------------------------------------

def reference(coll: CollectionSpec, batch: BatchSpec, tables: List[torch.Tensor],
              weights: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """``[B, sum(dims)]`` float64, tables in config order, each table's features in order.

    ``tables[t]``: ``[rows, dim]`` float64; ``weights[key]``: ``[ids of key]`` float64.
    """
    outs = []
    for spec, table in zip(coll.tables, tables):
        for f in spec.features:
            bags = batch.bags[f]
            ids = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
            lengths = torch.tensor([len(bag) for bag in bags], dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            pooled = F.embedding_bag(ids, table, offsets, mode="sum", include_last_offset=True,
                                     per_sample_weights=None if weights is None else weights[f])
            if spec.pooling == jr.PoolingType.MEAN:  # weighted MEAN divides by the bag's length too
                pooled = pooled / lengths.clamp(min=1).double().unsqueeze(1)
            outs.append(pooled)
    return torch.cat(outs, dim=1)


class Expected:
    """The reference forward and gradients for one batch, with their magnitudes: the same
    computation over absolute values, which bounds every sum's terms.

    ``out``: ``[B, sum(dims)]``; ``table_grads[t]``: ``[rows, dim]`` (duplicate ids summed);
    ``weight_grads``: ``[N]`` in the KJT's id order, or None; each with a ``*_mag(s)`` twin.
    ``tables[t]``: ``[rows, dim]`` float64 stored rows; ``upstream``: ``[B, sum(dims)]`` fp32.
    """

    def __init__(self, coll: CollectionSpec, batch: BatchSpec, tables: List[torch.Tensor], upstream: torch.Tensor):
        self.out, self.table_grads, self.weight_grads = self._run(coll, batch, tables, upstream, abs_=False)
        self.out_mag, self.table_grad_mags, self.weight_grad_mags = self._run(coll, batch, tables, upstream, abs_=True)

    @staticmethod
    def _run(coll, batch, tables, upstream, abs_):
        leaves = [(t.abs() if abs_ else t).clone().requires_grad_() for t in tables]
        weights = None
        if batch.weights is not None:
            weights = {}
            for k in batch.keys:
                w = torch.tensor([x for bag in batch.weights[k] for x in bag], dtype=torch.float64)
                weights[k] = (w.abs() if abs_ else w).requires_grad_()
        out = reference(coll, batch, leaves, weights)
        out.backward(upstream.double().abs() if abs_ else upstream.double())
        table_grads = [leaf.grad for leaf in leaves]
        weight_grads = None
        if weights is not None:  # keys no table reads get zeros
            weight_grads = torch.cat([torch.zeros_like(weights[k]) if weights[k].grad is None else weights[k].grad
                                      for k in batch.keys])
        return out.detach(), table_grads, weight_grads


def assert_within(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, rtol: float,
                  what: str) -> None:
    """``|actual - expected| <= ATOL + rtol * magnitude`` elementwise; NaN and inf fail."""
    shapes = tuple(actual.shape), tuple(expected.shape)
    assert shapes[0] == shapes[1], f"{what}: shape {shapes[0]} != {shapes[1]}"
    actual = actual.detach().cpu()
    err = (actual.double() - expected).abs()
    bound = ATOL + rtol * magnitude
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(int(x) for x in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: "
                             f"{actual[i].item()!r} vs expected {expected[i].item()!r} (bound {bound[i].item():.3g})")


# --- building and reading the module --------------------------------------------------------

def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def build(coll: CollectionSpec, backend: str, **kwargs) -> Tuple[jr.EmbeddingBagCollection, torch.Generator]:
    """The collection, with every table overwritten by seeded random rows (never zeros)."""
    ebc = jr.EmbeddingBagCollection(coll.configs(), is_weighted=coll.weighted, backend=backend,
                                    device=device_of(backend), **kwargs)
    gen = torch.Generator().manual_seed(coll.seed)
    with torch.no_grad():
        for spec in coll.tables:
            rows = torch.randn(spec.rows, spec.dim, generator=gen, dtype=torch.float64) * coll.scale
            if spec.data_type == jr.DataType.FP16:
                rows = rows.clamp(-60000, 60000)  # inside fp16's range
            dtype = TORCH_DTYPES[spec.data_type]
            view = ebc.embedding_bags[spec.name].weight
            assert view.dtype == dtype and tuple(view.shape) == (spec.rows, spec.dim)
            view.copy_(rows)
            # the view is live: what we wrote is what the table now holds
            assert torch.equal(ebc.embedding_bags[spec.name].weight.detach().cpu(), rows.to(dtype)), spec.name
    return ebc, gen


def stored_tables(ebc: jr.EmbeddingBagCollection, coll: CollectionSpec) -> List[torch.Tensor]:
    """Each table's stored (rounded) rows, as float64 copies."""
    return [ebc.embedding_bags[t.name].weight.detach().cpu().double().clone() for t in coll.tables]


def flat_of(ebc: jr.EmbeddingBagCollection, view: torch.Tensor) -> torch.nn.Parameter:
    """The flat parameter that ``view`` (a table's weight) lives in."""
    matches = [p for p in ebc.flat_weights.values()
               if p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()]
    assert len(matches) == 1
    return matches[0]


def table_grad(ebc: jr.EmbeddingBagCollection, name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[rows, dim]`` gradient of table ``name`` read from its flat parameter's ``.grad``
    (densified), and the flat gradient as it came (None if there is none)."""
    view = ebc.embedding_bags[name].weight
    flat = flat_of(ebc, view)
    if flat.grad is None:
        return torch.zeros(view.shape, dtype=view.dtype), None
    dense = flat.grad.coalesce().to_dense() if flat.grad.is_sparse else flat.grad
    start = view.storage_offset() - flat.storage_offset()
    return dense[start:start + view.numel()].view(view.shape), flat.grad


def touched_rows(coll: CollectionSpec, batch: BatchSpec, t: int) -> torch.Tensor:
    """Sorted distinct rows of table ``t`` that the batch reads."""
    ids = {i for f in coll.tables[t].features for bag in batch.bags[f] for i in bag}
    return torch.tensor(sorted(ids), dtype=torch.long)


def check_forward(out: jr.KeyedTensor, coll: CollectionSpec, batch: BatchSpec, expected: Expected) -> None:
    assert out.keys() == coll.output_keys()
    assert out.length_per_key() == [t.dim for t in coll.tables for _ in t.features]
    values = out.values()
    assert values.dtype == torch.float32
    assert tuple(values.shape) == (batch.batch, sum(t.dim for t in coll.tables for _ in t.features))
    assert_within(values, expected.out, expected.out_mag, FWD_RTOL, "forward")


def check_weight_grad(kjt: jr.KeyedJaggedTensor, coll: CollectionSpec, batch: BatchSpec, expected: Expected,
                      what: str) -> None:
    """The per-id-weight gradient; exactly zero for ids of keys no table reads."""
    w = kjt.weights()
    grad = torch.zeros(w.shape) if w.grad is None else w.grad.cpu()
    assert grad.dtype == w.dtype
    read = coll.key_rows()
    for key, where in batch.key_slices().items():
        if key not in read:
            assert not grad[where].any(), f"{what}: nonzero gradient for weights of unread key {key!r}"
    assert_within(grad, expected.weight_grads, expected.weight_grad_mags, FWD_RTOL, what)


def new_kjt(batch: BatchSpec, coll: CollectionSpec, backend: str, storage: str) -> jr.KeyedJaggedTensor:
    kjt = batch.kjt(storage, device_of(backend))
    if coll.weighted:
        kjt.weights().requires_grad_(True)
    return kjt


# Switches inside jaggedrec that send the same batch down another implementation: the paths
# that batches this small would not take on their own. (target, value) pairs for monkeypatch.
CODE_PATHS = {
    "default": (),
    # torch path: one embedding_bag per feature (taken from 4096 ids per feature on)
    "per_feature": (("jaggedrec.ops.pooled_torch._PER_FEATURE_MIN_IDS", 0),),
    # torch path: the branch without host reads, which compiled graphs and GPUs take
    "static": (("jaggedrec.ops.backends.host_readable", lambda *tensors: False),),
    # fused torch step: stream every block of rows whole, or step the touched rows one by one,
    # or step a few rows (48 bytes) at a time
    "stream": (("jaggedrec.ops.fused_rows._STREAM_MIN_TOUCHED", dict.fromkeys((1, 2, 3), 0.0)),),
    "scatter": (("jaggedrec.ops.fused_rows._STREAM_MIN_TOUCHED", dict.fromkeys((1, 2, 3), float("inf"))),),
    "small_chunks": (("jaggedrec.ops.fused_rows._CHUNK_BYTES", 48),),
    # Triton backward: rows read more than LONG_RUN times (hot rows) are summed by a kernel of
    # their own; at 1 tiny batches have both kinds of rows, at 0 every row is hot
    "hot_rows": (("jaggedrec.kernels.row_runs.LONG_RUN", 1),),
    "all_hot": (("jaggedrec.kernels.row_runs.LONG_RUN", 0),),
}
TORCH_PATHS = st.sampled_from(["default", "per_feature", "static"])
FUSED_TORCH_PATHS = st.sampled_from(["default", "static", "stream", "scatter", "small_chunks"])
TRITON_PATHS = st.sampled_from(["default", "hot_rows", "all_hot"])


@contextmanager
def code_path(name: str):
    with pytest.MonkeyPatch.context() as mp:
        for target, value in CODE_PATHS[name]:
            mp.setattr(target, value)
        yield


# --- forward and gradients --------------------------------------------------------------

def forward_and_grads(coll: CollectionSpec, batch: BatchSpec, backend: str, sparse: bool, storage: str,
                      **kwargs) -> None:
    """Forward, table gradients (dense, or sparse and densified) and per-id-weight gradients."""
    ebc, gen = build(coll, backend, sparse=sparse, **kwargs)
    tables = stored_tables(ebc, coll)
    kjt = new_kjt(batch, coll, backend, storage)
    out = ebc(kjt)
    upstream = torch.randn(out.values().shape, generator=gen)
    expected = Expected(coll, batch, tables, upstream)
    check_forward(out, coll, batch, expected)
    out.values().backward(upstream.to(out.values().device))
    for t, spec in enumerate(coll.tables):
        grad, flat_grad = table_grad(ebc, spec.name)
        dtype = TORCH_DTYPES[spec.data_type]
        if flat_grad is not None:
            assert flat_grad.is_sparse == sparse and flat_grad.dtype == dtype
        assert_within(grad, expected.table_grads[t], expected.table_grad_mags[t], STORED_RTOL[dtype],
                      f"gradient of {spec.name}")
        if sparse and flat_grad is not None:
            # a sparse gradient holds the touched rows' elements only
            view = ebc.embedding_bags[spec.name].weight
            start = view.storage_offset() - flat_of(ebc, view).storage_offset()
            inside = flat_grad.coalesce().indices()[0]
            inside = inside[(inside >= start) & (inside < start + view.numel())] - start
            assert set((inside // spec.dim).tolist()) <= set(touched_rows(coll, batch, t).tolist()), spec.name
    if coll.weighted:
        check_weight_grad(kjt, coll, batch, expected, "gradient of per-id weights")


@st.composite
def torch_cases(draw):
    coll = draw(collections(scales=(1.0, 1.0, 1.0, 3e4)))
    return coll, draw(batches(coll)), draw(st.booleans()), draw(st.booleans())


@settings(max_examples=400, **SETTINGS)
@given(case=torch_cases(), path=TORCH_PATHS)
def test_forward_and_gradients_torch(case, path):
    """Torch path: any tables, any KJT layout, dense or sparse gradients, validated or not."""
    coll, batch, sparse, validate = case
    with code_path(path):
        forward_and_grads(coll, batch, "torch", sparse, storage="one", validate=validate)


@st.composite
def triton_cases(draw):
    coll = draw(collections(max_tables=2, dims=TRITON_DIMS, max_rows=50, max_features=2))
    batch = draw(batches(coll, max_batch=4, max_len=3, max_extra_keys=1))
    return coll, batch, draw(st.booleans()), draw(st.booleans())


_TWO_TABLES = CollectionSpec((TableSpec("t_user", 4, 5, jr.PoolingType.SUM, jr.DataType.FP32, ("a",)),
                               TableSpec("t_item", 3, 2, jr.PoolingType.MEAN, jr.DataType.FP16, ("b", "a"))),
                              weighted=True, seed=1, scale=1.0)


@pytest.mark.interpret
@settings(max_examples=40, **SETTINGS)
@given(case=triton_cases(), path=TRITON_PATHS)
# no bags at all, and bags with no ids: launches over nothing
@example(case=(_TWO_TABLES, batch_spec(["b", "a"], {"a": [], "b": []}, {"a": [], "b": []}), False, True),
         path="default")
@example(case=(_TWO_TABLES, batch_spec(["a", "b"], {"a": [[]] * 3, "b": [[]] * 3}, {"a": [[]] * 3, "b": [[]] * 3},
                                       given="offsets", offsets="expanded"), True, False), path="all_hot")
def test_forward_and_gradients_triton(case, path):
    """Triton kernels (interpreted on CPU): the same checks on tiny problems; sorted
    (deterministic) or atomic backward, dense or sparse gradients."""
    coll, batch, sparse, deterministic = case
    with code_path(path):
        forward_and_grads(coll, batch, "triton", sparse, storage="padded", deterministic=deterministic)


# --- fused optimizers ---------------------------------------------------------------------

class OptimizerReference:
    """Float64 optimizer state per table, stepped by the formulas in ``jaggedrec.optim``."""

    def __init__(self, opt, coll: CollectionSpec):
        self.opt, self.steps = opt, 0
        self.sum_sq = [torch.zeros(t.rows, dtype=torch.float64) for t in coll.tables]
        self.m = [torch.zeros(t.rows, t.dim, dtype=torch.float64) for t in coll.tables]
        self.v = [torch.zeros(t.rows, t.dim, dtype=torch.float64) for t in coll.tables]

    def step(self, t: int, table: torch.Tensor, grad: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
        """``[rows, dim]`` ``table`` with its ``[T]`` ``touched`` rows stepped by the ``[rows, dim]``
        ``grad`` (duplicate ids already summed); the state of table ``t`` is updated in place."""
        o, new = self.opt, table.clone()
        w, g = table[touched], grad[touched]
        if isinstance(o, optim.SGD):
            new[touched] = w - o.lr * g
        elif isinstance(o, optim.RowWiseAdagrad):
            g = g + o.weight_decay * w
            self.sum_sq[t][touched] += g.square().mean(1)
            new[touched] = w - o.lr * g / (self.sum_sq[t][touched].sqrt() + o.eps).unsqueeze(1)
        else:  # lazy Adam: moments of touched rows only, bias-corrected by the step count
            g = g + o.weight_decay * w
            b1, b2 = o.betas
            self.m[t][touched] = b1 * self.m[t][touched] + (1 - b1) * g
            self.v[t][touched] = b2 * self.v[t][touched] + (1 - b2) * g.square()
            m_hat = self.m[t][touched] / (1 - b1 ** self.steps)
            v_hat = self.v[t][touched] / (1 - b2 ** self.steps)
            new[touched] = w - o.lr * m_hat / (v_hat.sqrt() + o.eps)
        return new


LRS = st.sampled_from([0.1, 0.01, 0.5, 0.0])
EPS = st.sampled_from([1e-8, 1e-6, 1e-2])
DECAY = st.sampled_from([0.0, 0.01, 0.1])
OPTIMIZER_KINDS = ["sgd", "rowwise_adagrad", "adam"]  # a test each, so that each gets its share


def optimizers(kind: str):
    if kind == "sgd":
        return st.builds(optim.SGD, lr=LRS)
    if kind == "rowwise_adagrad":
        return st.builds(optim.RowWiseAdagrad, lr=LRS, eps=EPS, weight_decay=DECAY)
    return st.builds(optim.Adam, lr=LRS, betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.5)]), eps=EPS,
                     weight_decay=DECAY)


def fused_steps(coll: CollectionSpec, opt, steps: List[BatchSpec], backend: str, storage: str, **kwargs) -> None:
    """Each step: forward, backward (which updates the touched rows), then the rows against
    the reference update of the rows as they were before the step, the untouched rows
    bit-for-bit unchanged, and the per-id-weight gradient against the one computed from the
    rows the forward read."""
    ebc, gen = build(coll, backend, fused_optimizer=opt, **kwargs)
    ref = OptimizerReference(opt, coll)
    for s, batch in enumerate(steps):
        before = stored_tables(ebc, coll)
        kjt = new_kjt(batch, coll, backend, storage)
        out = ebc(kjt)
        upstream = torch.randn(out.values().shape, generator=gen)
        expected = Expected(coll, batch, before, upstream)
        check_forward(out, coll, batch, expected)
        out.values().backward(upstream.to(out.values().device))
        ref.steps += 1
        assert all(p.grad is None for p in ebc.flat_weights.values()), "a fused optimizer leaves no weight gradient"
        for t, spec in enumerate(coll.tables):
            touched = touched_rows(coll, batch, t)
            new = ref.step(t, before[t], expected.table_grads[t], touched)
            actual = ebc.embedding_bags[spec.name].weight.detach().cpu()
            untouched = torch.ones(spec.rows, dtype=torch.bool)
            untouched[touched] = False
            assert torch.equal(actual.double()[untouched], before[t][untouched]), \
                f"step {s}: untouched rows of {spec.name} changed"
            assert_within(actual, new, new.abs() + before[t].abs(), STORED_RTOL[actual.dtype],
                          f"step {s}: {type(opt).__name__} update of {spec.name}")
        if coll.weighted:
            check_weight_grad(kjt, coll, batch, expected,
                              f"step {s}: gradient of per-id weights under a fused optimizer")


@st.composite
def fused_torch_cases(draw, kind):
    coll = draw(collections(max_tables=3))
    steps = [draw(batches(coll)) for _ in range(draw(st.integers(1, 2)))]
    return coll, draw(optimizers(kind)), steps


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_fused_optimizers_torch(kind, data):
    """Torch path: SGD, row-wise Adagrad and lazy Adam over one or two steps."""
    coll, opt, steps = data.draw(fused_torch_cases(kind))
    with code_path(data.draw(FUSED_TORCH_PATHS, label="path")):
        fused_steps(coll, opt, steps, "torch", storage="one")


@st.composite
def fused_triton_cases(draw, kind):
    coll = draw(collections(max_tables=2, dims=TRITON_DIMS, max_rows=30, max_features=2))
    steps = [draw(batches(coll, max_batch=4, max_len=3, max_extra_keys=1)) for _ in range(draw(st.integers(1, 2)))]
    return coll, draw(optimizers(kind)), steps


@pytest.mark.interpret
@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_fused_optimizers_triton(kind, data):
    """Triton kernels (interpreted on CPU): the fused step on tiny problems, hot-row kernel or not."""
    coll, opt, steps = data.draw(fused_triton_cases(kind))
    with code_path(data.draw(TRITON_PATHS, label="path")):
        fused_steps(coll, opt, steps, "triton", storage="padded")


# --- batches that must be refused ---------------------------------------------------------------

@st.composite
def ids_without_bags(draw):
    """B == 0 (empty lengths, or offsets ``[0]``) but some ids."""
    coll = draw(collections(max_tables=2, max_rows=20))
    batch = draw(batches(coll, max_batch=0))
    n = draw(st.integers(1, 5))
    return coll, batch, n


@pytest.mark.parametrize("backend", ["torch", TRITON])
@settings(max_examples=10, **SETTINGS)
@given(case=ids_without_bags())
def test_ids_without_bags_raise(backend, case):
    """B == 0 with ids: they belong to no bag and would be dropped; refused, validate or not."""
    coll, batch, n = case
    ebc, _ = build(coll, backend)
    kjt = batch.kjt(device=device_of(backend))
    values = torch.zeros(n, dtype=batch.id_dtype, device=device_of(backend))
    weights = torch.ones(n, device=device_of(backend)) if coll.weighted else None
    bad = jr.KeyedJaggedTensor(kjt.keys(), values, weights, lengths=kjt.lengths_or_none(),
                               offsets=kjt.offsets_or_none())
    for validate in (True, False):  # a size check: free, so always on
        ebc.validate = validate
        with pytest.raises(ValueError):
            ebc(bad)


@st.composite
def disagreeing_lengths_and_offsets(draw, max_batch):
    """A valid batch given both ways, then one id moved from one bag to another in the
    lengths only: each is valid alone, the two disagree."""
    coll = draw(collections(max_tables=2, max_rows=20))
    batch = draw(batches(coll, min_batch=1, max_batch=max_batch).filter(
        lambda b: len(b.ids()) > 0 and len(b.lengths()) > 1))
    batch.given = "both"
    lengths = batch.lengths()
    src = draw(st.sampled_from([i for i, n in enumerate(lengths) if n > 0]))
    dst = draw(st.sampled_from([i for i in range(len(lengths)) if i != src]))
    return coll, batch, src, dst


@pytest.mark.parametrize("backend", ["torch", TRITON])
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_disagreeing_lengths_and_offsets_raise(backend, data):
    """Lengths and offsets both given, each valid, but not the same bags: refused (validate=True)."""
    # small batches for the interpreter: until validation refuses them, they reach the kernels
    coll, batch, src, dst = data.draw(disagreeing_lengths_and_offsets(6 if backend == "torch" else 2))
    ebc, _ = build(coll, backend)
    kjt = batch.kjt(device=device_of(backend))
    lengths = kjt.lengths().clone()
    lengths[src] -= 1
    lengths[dst] += 1
    bad = jr.KeyedJaggedTensor(kjt.keys(), kjt.values(), kjt.weights_or_none(), lengths=lengths,
                               offsets=kjt.offsets())
    with pytest.raises(ValueError):
        ebc(bad)


# --- targeted examples -----------------------------------------------------------------------

def _one_table(data_type, rows: torch.Tensor, pooling=jr.PoolingType.SUM, weighted=False, backend="torch"):
    """A collection of one table holding ``rows`` (``[rows, dim]``, exact in ``data_type``)."""
    configs = [jr.EmbeddingBagConfig(name="t", embedding_dim=rows.shape[1], num_embeddings=rows.shape[0],
                                     feature_names=["f"], data_type=data_type, pooling=pooling)]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted, backend=backend, device=device_of(backend))
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(rows)
    assert torch.equal(ebc.embedding_bags["t"].weight.detach().cpu().double(), rows)
    return ebc


def _pool(ebc: jr.EmbeddingBagCollection, ids: List[int], lengths: torch.Tensor,
          weights: Optional[List[float]] = None) -> torch.Tensor:
    """``[B, dim]`` float64 output of one batch, built on the module's device."""
    device = ebc.embedding_bags["t"].weight.device
    kjt = jr.KeyedJaggedTensor(["f"], torch.tensor(ids, device=device),
                               None if weights is None else torch.tensor(weights, device=device),
                               lengths=lengths.to(device))
    out = ebc(kjt).values()
    assert out.dtype == torch.float32
    return out.detach().cpu().double()


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_half_rows_sum_in_fp32(backend):
    """fp16 rows of 40000 (max 65504) summed in fp32 make 80000, not inf; bf16 256 + 4 x 1 is
    260 in fp32, but 256 if summed in bf16 (257 is not a bf16 number)."""
    rows = torch.tensor([[40000.0, -40000.0, 1.0], [40000.0, 30000.0, 0.5]], dtype=torch.float64)
    for pooling, expected in ((jr.PoolingType.SUM, [[80000.0, -10000.0, 1.5], [120000.0, -50000.0, 2.5], [0, 0, 0]]),
                              (jr.PoolingType.MEAN, [[40000.0, -5000.0, 0.75], [40000.0, -50000 / 3, 2.5 / 3],
                                                     [0, 0, 0]])):
        out = _pool(_one_table(jr.DataType.FP16, rows, pooling, backend=backend), [0, 1, 0, 0, 1],
                    torch.tensor([2, 3, 0]))
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    out = _pool(_one_table(jr.DataType.FP16, rows, weighted=True, backend=backend), [0, 1], torch.tensor([2]),
                [1.5, 1.0])
    torch.testing.assert_close(out, torch.tensor([[100000.0, -30000.0, 2.0]], dtype=torch.float64))

    bf = _one_table(jr.DataType.BF16, torch.tensor([[256.0], [1.0]], dtype=torch.float64), backend=backend)
    assert _pool(bf, [0, 1, 1, 1, 1], torch.tensor([5])).tolist() == [[260.0]]


@pytest.mark.parametrize("backend, dtype, lengths", [
    ("torch", torch.uint8, [200, 100]),      # offsets 200, 300: past uint8's 255
    ("torch", torch.int8, [100, 100]),       # 200: past int8's 127
    ("torch", torch.int16, [20000, 20000]),  # 40000: past int16's 32767
    pytest.param("triton", torch.uint8, [200, 100], marks=pytest.mark.interpret),
])
def test_narrow_length_dtypes(backend, dtype, lengths):
    """Lengths in a narrow integer dtype whose running sum does not fit it."""
    gen = torch.Generator().manual_seed(0)
    # small integers: the sums of 20000 rows are exact in fp32, whatever the order
    rows = torch.randint(-4, 5, (5, 2), generator=gen).double()
    ebc = _one_table(jr.DataType.FP32, rows, backend=backend)
    ids = torch.randint(0, 5, (sum(lengths),), generator=gen)
    out = _pool(ebc, ids.tolist(), torch.tensor(lengths, dtype=dtype))
    expected = torch.stack([rows[b].sum(0) for b in torch.split(ids, lengths)])
    assert torch.equal(out, expected)
