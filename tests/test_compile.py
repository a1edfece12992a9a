"""torch.compile and torch.export of the EmbeddingBagCollection (and, where it differs, the
EmbeddingCollection), on the CPU torch path.

Every compiled result is compared, batch by batch, with the same computation run eagerly
(itself checked against the float64 reference in test_ebc.py). Batches vary on purpose:
B=1, features with no ids, batches of 0 or 1 ids, every bag one id, KJT keys in another
order than the tables'. Frames are counted with dynamo's CompileCounter: the KJT marks its
sizes dynamic itself, so the first compile is already dynamic, and only B=1 may add a second.
"""

import copy
import dataclasses
import io
import logging
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.export import Dim

import jaggedrec as jr
from jaggedrec import optim
from jr_testing import Batch, assert_close, key_rows, random_kjt, reference_pooled, shuffled_keys

# fp32 and fp16 tables (two op calls whose columns interleave), MEAN, odd dims, and
# feature "f0" read by two tables
CONFIGS = [
    jr.EmbeddingBagConfig(name="t0", embedding_dim=5, num_embeddings=23, feature_names=["f0"]),
    jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=11, feature_names=["f1", "g1"],
                          pooling=jr.PoolingType.MEAN),
    jr.EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=17, feature_names=["f2", "f0"],
                          data_type=jr.DataType.FP16),
    jr.EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=29, feature_names=["f3"]),
]
ROWS = dict(key_rows(CONFIGS), unused=1000)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles and graph breaks, and leaves no compiled state behind."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _few_ids_batch(keys: List[str], batch: int, ids: int, weighted: bool) -> Batch:
    """A batch of ``ids`` ids in total (0 or 1 here), all in the first sample of ``keys[0]``."""
    per_key = {}
    for i, key in enumerate(keys):
        lengths = torch.zeros(batch, dtype=torch.int64)
        n = ids if i == 0 else 0
        lengths[0] = n
        per_key[key] = (torch.full((n,), 2), lengths, torch.full((n,), 0.75) if weighted else None)
    kjt = jr.KeyedJaggedTensor(keys, torch.cat([per_key[k][0] for k in keys]),
                               torch.cat([per_key[k][2] for k in keys]) if weighted else None,
                               lengths=torch.cat([per_key[k][1] for k in keys]))
    return Batch(kjt, per_key)


def _varied_batches(gen: torch.Generator, keys: List[str], weighted: bool) -> List[Batch]:
    """20 batches of varying B and N, including the cases that recompile in TorchRec."""
    def make(batch, **kw):
        return random_kjt(gen, keys, ROWS, batch, weighted=weighted, **kw)
    return [
        make(4), make(7), make(1), make(5, empty_keys=["f1"]), make(3, one_hot=True),
        make(1, one_hot=True), make(12, max_len=9), make(2, empty_keys=keys),  # no ids at all
        _few_ids_batch(keys, 3, 1, weighted), _few_ids_batch(keys, 1, 1, weighted),
        make(9, empty_keys=["f0", "f3"]), make(6), make(1, empty_keys=["f2"]), make(33),
        make(8, one_hot=True), _few_ids_batch(keys, 5, 0, weighted), make(2), make(15, max_len=1),
        make(11), make(3),
    ]


def _flat_grads(module: torch.nn.Module) -> List[torch.Tensor]:
    return [p.grad for p in module.parameters()]


def _assert_no_graph_breaks() -> None:
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


def test_module_compiles_once_for_varied_batches():
    """fullgraph, inductor: outputs and gradients (tables and per-id weights) equal eager ones on
    every batch; at most two compiles (the dynamic graph, and B=1), none after the second."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(CONFIGS, is_weighted=True, backend="torch")
    eager = copy.deepcopy(ebc)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ebc, backend=counter, fullgraph=True)
    keys = shuffled_keys(gen, list(ROWS))
    frames = []
    for i, b in enumerate(_varied_batches(gen, keys, weighted=True)):
        twin = jr.KeyedJaggedTensor(keys, b.kjt.values(), b.kjt.weights().clone(), lengths=b.kjt.lengths())
        b.kjt.weights().requires_grad_(True)
        twin.weights().requires_grad_(True)
        out, ref = compiled(b.kjt), eager(twin)
        assert out.keys() == ref.keys() and out.length_per_key() == ref.length_per_key()
        assert_close(out.values(), ref.values(), torch.float16, f"batch {i}: forward")
        assert_close(out.values(), reference_pooled(eager, b), torch.float16, f"batch {i}: reference")
        upstream = torch.randn(out.values().shape, generator=gen)
        (out.values() * upstream).sum().backward()
        (ref.values() * upstream).sum().backward()
        for got, want in zip(_flat_grads(ebc), _flat_grads(eager)):
            assert_close(got, want, want.dtype, f"batch {i}: table gradient")
        assert_close(b.kjt.weights().grad, twin.weights().grad, torch.float16, f"batch {i}: weight gradient")
        ebc.zero_grad(), eager.zero_grad()
        frames.append(counter.frame_count)
    _assert_no_graph_breaks()
    # the second batch (other B, other N) reuses the first graph: it was compiled dynamic
    assert frames[1] == 1 and frames[-1] <= 2, f"compiles after each batch: {frames}"


def test_reusing_a_kjt_does_not_recompile():
    """A KJT run twice, or run eagerly first (which caches its offsets), meets the same graph."""
    gen = torch.Generator().manual_seed(4)
    ebc = jr.EmbeddingBagCollection(CONFIGS, backend="torch")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ebc, backend=counter, fullgraph=True)
    for batch, eager_first in ((5, False), (7, True)):
        kjt = random_kjt(gen, list(ROWS), ROWS, batch).kjt
        twin = jr.KeyedJaggedTensor(list(ROWS), kjt.values(), lengths=kjt.lengths())
        want = ebc(kjt if eager_first else twin).values()
        assert (kjt.offsets_or_none() is not None) == eager_first
        for _ in range(2):
            assert_close(compiled(kjt).values(), want, torch.float16, f"batch {batch}")
    assert counter.frame_count == 1
    # a KJT built from offsets is another graph, once
    for batch in (3, 6):
        b = random_kjt(gen, list(ROWS), ROWS, batch, use_offsets=True)
        assert_close(compiled(b.kjt).values(), reference_pooled(ebc, b), torch.float16, f"offsets, batch {batch}")
    assert counter.frame_count == 2
    _assert_no_graph_breaks()


def _model(ebc: jr.EmbeddingBagCollection) -> torch.nn.Module:
    width = sum(c.embedding_dim * len(c.feature_names) for c in ebc.embedding_bag_configs())

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = ebc
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def forward(self, kjt: jr.KeyedJaggedTensor) -> torch.Tensor:
            return self.mlp(self.ebc(kjt).values()).squeeze(1)

    return Model()


# (fused optimizer of the collection, optimizer of the rest). Adam's eps must survive fp16
# (the t2 table's state), or both runs divide 0 by 0.
OPTIMIZERS = {
    "sgd": (None, lambda p: torch.optim.SGD(p, lr=0.5)),
    "adam": (None, lambda p: torch.optim.Adam(p, lr=0.05, eps=1e-4)),
    "fused_rowwise_adagrad": (optim.RowWiseAdagrad(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_adam": (optim.Adam(lr=0.05, eps=1e-4), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_adagrad": (optim.Adagrad(lr=0.1, eps=1e-4), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_lars_sgd": (optim.LarsSGD(lr=0.1, eta=0.5, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_partial_rowwise_adam": (optim.PartialRowWiseAdam(lr=0.05, eps=1e-4), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_lamb": (optim.LAMB(lr=0.05, eps=1e-4), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_adagrad_clipped": (optim.Adagrad(lr=0.1, eps=1e-4, max_gradient=0.01), lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_rowwise_adagrad_decoupled": (optim.RowWiseAdagrad(lr=0.1, weight_decay=0.1, weight_decay_mode="decouple"),
                                        lambda p: torch.optim.SGD(p, lr=0.5)),
    "fused_partial_rowwise_lamb": (optim.PartialRowWiseLAMB(lr=0.05, eps=1e-4), lambda p: torch.optim.SGD(p, lr=0.5)),
}


@pytest.mark.parametrize("optimizers", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_training_step_matches_eager(optimizers):
    """EBC + MLP compiled whole (fullgraph, inductor, backward through AOTAutograd); the loss,
    backward() and the optimizer step written as usual. Gradients, updated weights and
    optimizer state equal an eager twin's over steps of varying batch; one compile serves all."""
    fused, make_optimizer = optimizers
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = _model(jr.EmbeddingBagCollection(CONFIGS, backend="torch", fused_optimizer=fused))
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # a fused collection updates its own rows in the backward; the optimizer skips them (no .grad)
    opt, eager_opt = make_optimizer(model.parameters()), make_optimizer(eager.parameters())
    keys = shuffled_keys(gen, list(ROWS))
    batches = [random_kjt(gen, keys, ROWS, 6), random_kjt(gen, keys, ROWS, 9, empty_keys=["f2"]),
               random_kjt(gen, keys, ROWS, 4, one_hot=True), random_kjt(gen, keys, ROWS, 13),
               _few_ids_batch(keys, 2, 0, weighted=False)]
    for step, b in enumerate(batches):
        labels = torch.rand(b.kjt.stride(), generator=gen)
        twin = jr.KeyedJaggedTensor(keys, b.kjt.values(), lengths=b.kjt.lengths())
        logits, eager_logits = compiled(b.kjt), eager(twin)
        assert_close(logits, eager_logits, torch.float16, f"step {step}: logits")
        for o, out in ((opt, logits), (eager_opt, eager_logits)):
            o.zero_grad()
            F.binary_cross_entropy_with_logits(out, labels).backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if name == "ebc.fused_optimizer_state.backward_trigger":  # runs the fused step; its gradient is empty
                assert p.grad.numel() == q.grad.numel() == 0
                continue
            assert (p.grad is None) == (q.grad is None) == (fused is not None and name.startswith("ebc."))
            if p.grad is not None:
                assert_close(p.grad, q.grad, torch.float16, f"step {step}: gradient of {name}")
            assert_close(p.detach(), q.detach(), torch.float16, f"step {step}: {name} after the step")
        for (name, got), want in zip(model.named_buffers(), eager.buffers()):
            assert_close(got.double(), want.double(), torch.float16, f"step {step}: {name}")
    _assert_no_graph_breaks()
    assert counter.frame_count == 1


def test_sparse_types_as_compiled_inputs_and_outputs():
    """KJT, JaggedTensor and KeyedTensor pass in and out of a compiled function as pytrees."""
    gen = torch.Generator().manual_seed(2)
    ebc = jr.EmbeddingBagCollection(CONFIGS, backend="torch")

    def fn(kjt: jr.KeyedJaggedTensor, jt: jr.JaggedTensor, kt: jr.KeyedTensor):
        pooled = ebc(kjt)
        shifted = jr.KeyedJaggedTensor(kjt.keys(), kjt.values() + 1, lengths=kjt.lengths())
        doubled = jr.JaggedTensor(jt.values() * 2, lengths=jt.lengths())
        summed = jr.KeyedTensor(kt.keys(), kt.length_per_key(), kt.values() + pooled.values()[:, :kt.values().shape[1]])
        return pooled, shifted, doubled, summed

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for batch in (3, 5, 8):
        b = random_kjt(gen, list(ROWS), ROWS, batch)
        jt = jr.JaggedTensor(torch.randn(batch + 4, generator=gen), lengths=torch.tensor([3, 0, batch + 1]))
        kt = jr.KeyedTensor(["a", "b"], [2, 3], torch.randn(batch, 5, generator=gen))
        got, want = compiled(b.kjt, jt, kt), fn(b.kjt, jt, kt)
        assert [type(x) for x in got] == [jr.KeyedTensor, jr.KeyedJaggedTensor, jr.JaggedTensor, jr.KeyedTensor]
        assert_close(got[0].values(), want[0].values(), torch.float16, "pooled")
        assert got[1].keys() == want[1].keys() and got[1].stride() == batch
        assert torch.equal(got[1].values(), want[1].values()) and torch.equal(got[1].lengths(), want[1].lengths())
        assert torch.equal(got[2].values(), want[2].values())
        assert got[2].offsets().tolist() == [0, 3, 3, batch + 4]
        assert got[3].keys() == ["a", "b"] and got[3]["b"].shape == (batch, 3)
        assert_close(got[3].values(), want[3].values(), torch.float16, "keyed tensor")
    _assert_no_graph_breaks()
    # The KJT marks its sizes dynamic itself; the JT's and KT's sizes follow torch's automatic
    # dynamic shapes, which recompile once, when they first change.
    assert counter.frame_count == 2


def test_export_round_trip_with_dynamic_batch_and_ids(caplog):
    """Export once, save and load, then serve batches of other sizes: B=1 and 0 or 1 ids included."""
    gen = torch.Generator().manual_seed(3)
    ebc = jr.EmbeddingBagCollection(CONFIGS, is_weighted=True, backend="torch")
    keys = shuffled_keys(gen, list(ROWS))
    example = random_kjt(gen, keys, ROWS, 4, weighted=True).kjt
    # the KJT's pytree leaves: values, weights, lengths, offsets (None: this KJT has lengths)
    dynamic = {"features": [{0: Dim.AUTO}, {0: Dim.AUTO}, {0: Dim.AUTO}, None]}
    # backed_size_oblivious: without it export assumes every dynamic size is at least 2
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(ebc, (example,), dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    with caplog.at_level(logging.WARNING):
        served = torch.export.load(buffer).module()
    # the saved example input, a KJT, loads as a safe global: no fallback to weights_only=False
    assert "weights_only=False" not in caplog.text
    batches = _varied_batches(gen, keys, weighted=True)
    for i, b in enumerate(batches[:12]):
        out = served(b.kjt)
        assert isinstance(out, jr.KeyedTensor) and out.keys() == ebc(b.kjt).keys()
        assert_close(out.values(), ebc(b.kjt).values(), torch.float16, f"batch {i}")


def test_compiled_forward_names_the_feature_of_a_bad_id():
    """Compiled on CPU, an id outside its table raises (no wrong answer, no graph break)."""
    odd = 'g"1\\'  # a quote and a backslash: the message must survive Inductor's C++ codegen
    configs = [dataclasses.replace(c, feature_names=[odd if f == "g1" else f for f in c.feature_names])
               for c in CONFIGS]
    ebc = jr.EmbeddingBagCollection(configs, backend="torch")
    compiled = torch.compile(ebc, backend="inductor", fullgraph=True)
    keys = ["f3", "f0", "unused", "f1", odd, "f2"]
    lengths = torch.tensor([1, 1, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    good = [3, 4, 1, 2, 5, 999, 0, 6, 7, 1, 2, 16]
    assert compiled(jr.KeyedJaggedTensor(keys, torch.tensor(good), lengths=lengths)).values().shape == (2, 35)
    # g1's id 11 is past the 11-row t1, but inside the dim-8 block it shares with t3: unchecked,
    # it would silently read t3's first row
    for k, bad, feature, table in ((8, 11, "g'1/", "t1"), (11, 17, "f2", "t2"), (3, -1, "f0", "t0")):
        ids = list(good)
        ids[k] = bad
        with pytest.raises(RuntimeError, match=rf"feature '{feature}' \(table .*'{table}'.*\): ids out of range"):
            compiled(jr.KeyedJaggedTensor(keys, torch.tensor(ids), lengths=lengths))
    with pytest.raises(RuntimeError, match="negative lengths, or lengths that do not add up"):
        compiled(jr.KeyedJaggedTensor(keys, torch.tensor(good[:-1]), lengths=lengths))
    _assert_no_graph_breaks()


def test_embedding_collection_ignores_cached_counts():
    """A KJT caches its per-key id counts once anything reads them (``length_per_key()``,
    ``kjt[key]``, ``to_dict()``, an eager module); the compiled EmbeddingCollection counts them
    in the graph instead, so such KJTs meet one graph, as the bag collections do (it guarded on
    the cached ints: a graph for each of these 8 batches). Rows, lengths and ids (need_indices)
    against one float64 ``F.embedding`` per feature."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    configs = [jr.EmbeddingConfig(name="t0", embedding_dim=4, num_embeddings=11, feature_names=["a", "b"]),
               jr.EmbeddingConfig(name="t1", embedding_dim=3, num_embeddings=7, feature_names=["c"])]
    ec = jr.EmbeddingCollection(configs, need_indices=True, backend="torch")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ec, backend=counter, fullgraph=True)
    rows = {"a": 11, "b": 11, "c": 7}
    keys = shuffled_keys(gen, list(rows))
    fill_caches = [lambda kjt: kjt.length_per_key(), lambda kjt: kjt["a"], lambda kjt: kjt.to_dict(), ec,
                   lambda kjt: kjt.offset_per_key(), lambda kjt: None]
    tables64 = {c.name: ec.embeddings[c.name].weight.detach().double() for c in configs}
    for i, batch in enumerate((4, 7, 3, 9, 5, 2, 6, 8)):
        b = random_kjt(gen, keys, rows, batch, empty_keys=["b"] if i == 3 else ())
        fill_caches[i % len(fill_caches)](b.kjt)
        assert (b.kjt.length_per_key_or_none() is None) == (i % len(fill_caches) == 5)
        out = compiled(b.kjt)
        for c in configs:
            for f in c.feature_names:
                ids, lengths, _ = b.per_key[f]
                assert_close(out[f].values(), F.embedding(ids, tables64[c.name]), what=f"batch {i}: {f}")
                assert torch.equal(out[f].lengths(), lengths) and torch.equal(out[f].weights(), ids)
    _assert_no_graph_breaks()
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_gpu_compiled_forward_matches_eager():
    """GPU lane: the compiled forward runs the Triton kernels (no graph break), equals eager on
    varied batches, and prints compiled vs eager time for one DLRM-sized batch."""
    import triton.testing

    gen = torch.Generator().manual_seed(5)
    configs = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=100_000, feature_names=[f"f{i}"])
               for i in range(8)]
    ebc = jr.EmbeddingBagCollection(configs, device="cuda")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ebc, backend=counter, fullgraph=True)
    keys = shuffled_keys(gen, [c.feature_names[0] for c in configs])
    rows = {k: 100_000 for k in keys}
    with torch.no_grad():
        for i, batch in enumerate([512, 1, 77, 2048]):
            b = random_kjt(gen, keys, rows, batch, max_len=20, empty_keys=keys[:1] if i == 2 else ())
            kjt = b.kjt.to(torch.device("cuda"))
            assert_close(compiled(kjt).values(), ebc(kjt).values(), torch.float32, f"batch {batch}")
        kjt = random_kjt(gen, keys, rows, 4096, max_len=40).kjt.to(torch.device("cuda"))
        eager_ms = triton.testing.do_bench(lambda: ebc(kjt))
        compiled_ms = triton.testing.do_bench(lambda: compiled(kjt))
    # default settings: eager validation reads one flag to the host per batch; compiled, it is skipped on GPU
    print(f"\n{torch.cuda.get_device_name()}: 8 tables x 64 dims, B=4096, ~20 ids/bag, forward: "
          f"eager {eager_ms:.3f} ms, compiled {compiled_ms:.3f} ms")
    _assert_no_graph_breaks()
    assert counter.frame_count <= 2


def test_triton_backward_glue_compiles_with_unbacked_id_counts():
    """The torch ops that prepare the Triton backward (contributions, sorting into runs,
    hot-row lists) trace into one graph when the id count is unbacked, as it is in a compiled
    model, and match eager. The kernels themselves need a GPU to compile; this is the part
    that can be checked here."""
    from torch._dynamo.decorators import mark_unbacked

    from jaggedrec.kernels import row_runs
    from jaggedrec.ops import pooled_triton, runs_triton
    from jaggedrec.ops.feature_tables import FeatureTables
    from jaggedrec.ops.op_args import OpBatch

    # two tables of 5 rows, dims 8 and 8; key 1 is read by both (two passes); MEAN on feature 0
    tables = FeatureTables((0, 40, 40), (5, 5, 5), (8, 8, 8), (0, 1, 1), (1, 0, 0), 2)
    weights = torch.randn(80)
    meta = tables.meta(weights)
    grad_out = torch.randn(3, 24)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 0, 3, 4, 1, 2])  # batch 3, with an empty bag
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    values = torch.randint(0, 5, (int(offsets[-1]),), generator=gen)
    psw = torch.rand(values.shape[0], generator=gen)

    def glue(values, offsets, psw):
        batch = OpBatch(values, offsets, psw)
        parts = runs_triton.contributions(batch, tables, meta)
        runs = pooled_triton._runs(grad_out, weights, batch, parts, tables, meta)
        return tuple(t for t in runs)

    eager = glue(values, offsets, psw)
    for t in (values, psw):
        mark_unbacked(t, 0)
    compiled = torch.compile(glue, fullgraph=True, backend="inductor")(values, offsets, psw)
    # eager runs the index kernels, compiled (under the interpreter) their torch reference:
    # the same entries wherever the runs define them
    eager, compiled = row_runs.Runs(*eager), row_runs.Runs(*compiled)
    num, num_runs, num_long = eager.item_offset.shape[0], int(eager.num_runs), int(eager.num_long)
    defined = dict(run_start=num + 1, run_row=num_runs, run_feature=num_runs, long_runs=num_long)
    for name, a, b in zip(row_runs.Runs._fields, eager, compiled):
        size = defined.get(name, a.shape[0])
        assert torch.equal(a[:size], b[:size]), name
