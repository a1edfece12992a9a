"""Variable batch per feature (VBE): the collection against a batch expanded first.

A VBE batch holds ``B_k`` distinct bags per key and, per key, an inverse index from each of
the ``B`` samples to its bag. The reference repeats each key's bags by its inverse indices
into an ordinary ``[K*B]`` batch and pools that with one float64 ``F.embedding_bag`` per
feature (``jr_testing.reference_pooled``); gradients come from autograd through that float64
reference, and fused optimizer steps from a twin collection stepped on the expanded batch.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jr_testing import Batch, assert_close, key_rows, reference_pooled, shuffled_keys, table_grad

TRITON = pytest.param("triton", marks=pytest.mark.interpret)


def _configs(dims=(3, 5, 8)) -> List[jr.EmbeddingBagConfig]:
    # "user" is deduplicated across the batch; t_item's rows are read through two keys
    return [
        jr.EmbeddingBagConfig(name="t_user", embedding_dim=dims[0], num_embeddings=11, feature_names=["user"]),
        jr.EmbeddingBagConfig(name="t_item", embedding_dim=dims[1], num_embeddings=13, feature_names=["item", "hist"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="t_none", embedding_dim=dims[2], num_embeddings=5, feature_names=["none"]),
    ]


def random_vbe(gen: torch.Generator, keys: Sequence[str], rows: Dict[str, int], batch: int,
               bags: Dict[str, int], weighted: bool = False, id_dtype=torch.int64,
               empty_keys: Sequence[str] = ("none",), in_order: Sequence[str] = ()
               ) -> Tuple[jr.KeyedJaggedTensor, Batch]:
    """A VBE KJT with ``bags[key]`` distinct bags per key (empty bags, duplicate ids, a key with
    no ids), random inverse indices over a batch of ``batch`` (``in_order`` keys: sample ``b``
    reads bag ``b``, which the collection pools without a gather), and the same batch expanded."""
    vbe_values, vbe_lengths, vbe_weights, inverse, expanded = [], [], [], [], {}
    for key in keys:
        n_bags = bags[key]
        lengths = torch.zeros(n_bags, dtype=torch.int64) if key in empty_keys else \
            torch.randint(0, 4, (n_bags,), generator=gen)
        if n_bags > 1 and key not in empty_keys:
            lengths[0] = 0
        n = int(lengths.sum())
        values = torch.randint(0, max(1, rows[key] // 2), (n,), generator=gen)  # half the rows: duplicates
        weights = torch.rand(n, generator=gen) + 0.25
        # every bag read by some sample, as deduplication makes them (a bag no sample reads has
        # its rows read all the same: lazy Adam then decays their moments, as FBGEMM's would)
        inv = torch.cat([torch.arange(min(n_bags, batch)),
                         torch.randint(0, n_bags, (max(0, batch - n_bags),), generator=gen)])
        inv = torch.arange(batch) if key in in_order else inv[torch.randperm(batch, generator=gen)]
        starts = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        take = [torch.arange(int(starts[b]), int(starts[b + 1])) for b in inv.tolist()]
        take = torch.cat(take) if take else torch.empty(0, dtype=torch.int64)
        expanded[key] = (values[take], lengths[inv], weights[take] if weighted else None)
        vbe_values.append(values), vbe_lengths.append(lengths), vbe_weights.append(weights), inverse.append(inv)
    kjt = jr.KeyedJaggedTensor(
        list(keys), torch.cat(vbe_values).to(id_dtype), torch.cat(vbe_weights) if weighted else None,
        lengths=torch.cat(vbe_lengths).to(id_dtype), stride_per_key_per_rank=[[bags[k]] for k in keys],
        inverse_indices=(list(keys), torch.stack(inverse)))
    return kjt, Batch(None, expanded)


def _bags(batch: int) -> Dict[str, int]:
    return {"user": 1, "item": batch, "hist": max(1, batch // 2), "none": 3}


def _expanded_kjt(keys: Sequence[str], ref: Batch, id_dtype=torch.int64) -> jr.KeyedJaggedTensor:
    weighted = ref.per_key[keys[0]][2] is not None
    return jr.KeyedJaggedTensor(list(keys), torch.cat([ref.per_key[k][0] for k in keys]).to(id_dtype),
                                torch.cat([ref.per_key[k][2] for k in keys]) if weighted else None,
                                lengths=torch.cat([ref.per_key[k][1] for k in keys]).to(id_dtype))


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_vbe_forward_and_backward_match_expanded_batch(backend, weighted, id_dtype):
    gen = torch.Generator().manual_seed(3 + weighted)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted, backend=backend)
    keys = shuffled_keys(gen, ["user", "item", "hist", "none", "extra"])  # an extra key it ignores
    rows = {**key_rows(configs), "extra": 4}
    batch = 6 if backend == "triton" else 9
    # weighted: "extra" has more bags than the batch has samples, so the widest key sets the
    # op's stride and the output is gathered anew; else the output is the op's, in place
    extra_bags = batch + 2 if weighted else 2
    kjt, ref = random_vbe(gen, keys, rows, batch, {**_bags(batch), "extra": extra_bags}, weighted, id_dtype,
                          in_order=("item",))
    assert kjt.stride() == batch and kjt.variable_stride_per_key()

    tables64 = [ebc.embedding_bags[c.name].weight.detach().double().requires_grad_() for c in configs]
    # the reference's per-id weights are gathered from the VBE bags' weights, so their gradient
    # sums over every sample that shares a bag, as the collection's must
    psw = kjt.weights().detach().double().requires_grad_() if weighted else None
    weights64 = None
    if weighted:
        per_key = kjt.to_dict()
        weights64 = {}
        start = 0
        for k in keys:
            n = per_key[k].values().numel()
            bag_weights = psw[start:start + n]
            lengths = per_key[k].lengths().long()
            starts = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
            inv = kjt.inverse_indices()[1][keys.index(k)]
            take = [torch.arange(int(starts[b]), int(starts[b + 1])) for b in inv.tolist()]
            weights64[k] = bag_weights[torch.cat(take)] if take else bag_weights[:0]
            start += n
    expected = reference_pooled(ebc, ref, tables64, weights64)
    if weighted:
        kjt = jr.KeyedJaggedTensor(kjt.keys(), kjt.values(), kjt.weights().clone().requires_grad_(),
                                   lengths=kjt.lengths(), stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
                                   inverse_indices=kjt.inverse_indices())
    out = ebc(kjt)
    assert out.keys() == ["user", "item", "hist", "none"]
    assert_close(out.values(), expected, what="VBE forward")

    grad_out = torch.randn(expected.shape, generator=gen)
    (out.values() * grad_out).sum().backward()
    (expected * grad_out.double()).sum().backward()
    for c, t64 in zip(configs, tables64):
        assert_close(table_grad(ebc, c.name), t64.grad, what=f"weight gradient of {c.name}")
    if weighted:
        assert_close(kjt.weights().grad, psw.grad, what="per-id weight gradient")


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("opt", [optim.SGD(lr=0.3), optim.RowWiseAdagrad(lr=0.2, eps=1e-6),
                                 optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6)], ids=["sgd", "adagrad", "adam"])
def test_vbe_fused_optimizers_match_expanded_batch(backend, opt):
    """A duplicated sample's gradient is summed into its one bag before the step (TorchRec
    had bugs here: torchrec#1894, #1895): the VBE batch steps as the expanded one does."""
    gen = torch.Generator().manual_seed(11)
    configs = _configs()
    vbe_ebc = jr.EmbeddingBagCollection(configs, backend=backend, fused_optimizer=opt)
    twin, initial = copy.deepcopy(vbe_ebc), copy.deepcopy(vbe_ebc)
    keys = ["hist", "user", "none", "item"]
    batch = 5 if backend == "triton" else 8
    for step in range(3):
        kjt, ref = random_vbe(gen, keys, key_rows(configs), batch, _bags(batch), in_order=("item",) * (step % 2))
        grad_out = torch.randn(batch, sum(c.embedding_dim * len(c.feature_names) for c in configs), generator=gen)
        (vbe_ebc(kjt).values() * grad_out).sum().backward()
        (twin(_expanded_kjt(keys, ref)).values() * grad_out).sum().backward()
        for c in configs:
            assert_close(vbe_ebc.embedding_bags[c.name].weight, twin.embedding_bags[c.name].weight,
                         what=f"{c.name} after step {step}")
    for c in configs[:2]:  # the steps happened (t_none's feature has no ids)
        assert not torch.equal(vbe_ebc.embedding_bags[c.name].weight, initial.embedding_bags[c.name].weight)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_a_bag_no_sample_reads_is_not_touched(backend):
    """Lazy Adam steps only the rows a batch read. A VBE bag that no sample's inverse index
    names (bag 1, id 5, here) was pooled but read by nobody: its rows get no step, no weight
    decay and no moments, and a sparse gradient leaves them out, as in the expanded batch."""
    config = jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["u"])
    kjt = jr.KeyedJaggedTensor(["u"], torch.tensor([1, 2, 5, 2, 7]), lengths=torch.tensor([2, 1, 2]),
                               stride_per_key_per_rank=[[3]], inverse_indices=(["u"], torch.tensor([[0, 2, 0, 2]])))
    expanded = jr.KeyedJaggedTensor(["u"], torch.tensor([1, 2, 2, 7, 1, 2, 2, 7]), lengths=torch.tensor([2, 2, 2, 2]))
    grad_out = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    adam = optim.Adam(lr=0.1, weight_decay=0.05)
    torch.manual_seed(0)
    vbe_ebc = jr.EmbeddingBagCollection([config], backend=backend, fused_optimizer=adam)
    twin = copy.deepcopy(vbe_ebc)
    before = vbe_ebc.embedding_bags["t"].weight.clone()
    (vbe_ebc(kjt).values() * grad_out).sum().backward()
    (twin(expanded).values() * grad_out).sum().backward()
    after = vbe_ebc.embedding_bags["t"].weight
    assert torch.equal(after[5], before[5])
    assert not torch.equal(after[7], before[7])
    for name, value in twin.state_dict().items():
        assert_close(vbe_ebc.state_dict()[name], value, what=name)
    sparse = jr.EmbeddingBagCollection([config], backend=backend, sparse=True)
    (sparse(kjt).values() * grad_out).sum().backward()
    assert sorted(set((sparse.flat_weights["fp32"].grad.coalesce().indices()[0] // 4).tolist())) == [1, 2, 7]


def test_vbe_without_full_batch_features_and_inverse_only_kjt():
    """A non-VBE KJT with inverse indices is expanded too (TorchRec's module does so)."""
    gen = torch.Generator().manual_seed(5)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs)
    keys = ["user", "item", "hist", "none"]
    kjt, ref = random_vbe(gen, keys, key_rows(configs), 4, {k: 3 for k in keys})
    plain = jr.KeyedJaggedTensor(keys, kjt.values(), lengths=kjt.lengths(), inverse_indices=kjt.inverse_indices())
    assert not plain.variable_stride_per_key() and plain.stride() == 3
    assert_close(ebc(plain).values(), reference_pooled(ebc, ref), what="inverse indices without VBE")


def test_vbe_bad_input_names_the_feature():
    gen = torch.Generator().manual_seed(2)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs)
    keys = ["user", "item", "hist", "none"]
    kjt, _ = random_vbe(gen, keys, key_rows(configs), 4, _bags(4))
    no_inverse = jr.KeyedJaggedTensor(keys, kjt.values(), lengths=kjt.lengths(),
                                      stride_per_key_per_rank=kjt.stride_per_key_per_rank())
    with pytest.raises(ValueError, match="no inverse_indices"):
        ebc(no_inverse)
    table = kjt.inverse_indices()[1].clone()
    table[keys.index("hist"), 1] = _bags(4)["hist"]  # one past its last bag
    with pytest.raises(ValueError, match="feature 'hist': inverse_indices hold 2, outside its 2 bags"):
        ebc(jr.KeyedJaggedTensor(keys, kjt.values(), lengths=kjt.lengths(),
                                 stride_per_key_per_rank=kjt.stride_per_key_per_rank(), inverse_indices=(keys, table)))
    with pytest.raises(ValueError, match=r"features \['hist'\] have no row in the KeyedJaggedTensor's inverse"):
        ebc(jr.KeyedJaggedTensor(keys, kjt.values(), lengths=kjt.lengths(),
                                 stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
                                 inverse_indices=(["user", "item", "none"], table[[0, 1, 3]])))
    short = kjt.lengths()[:-1]
    with pytest.raises(ValueError, match="the sum of stride_per_key"):
        ebc(jr.KeyedJaggedTensor(keys, kjt.values(), lengths=short, stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
                                 inverse_indices=kjt.inverse_indices()))
    lengths = kjt.lengths().clone()
    lengths[kjt.lengths_offset_per_key()[keys.index("hist")] + 1] = -1
    with pytest.raises(ValueError, match="feature 'hist' .*sample 1 has negative length"):
        ebc(jr.KeyedJaggedTensor(keys, kjt.values(), lengths=lengths,
                                 stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
                                 inverse_indices=kjt.inverse_indices()))


def test_vbe_id_out_of_range_names_feature_and_bag():
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs)
    kjt = jr.KeyedJaggedTensor(["user", "item", "hist", "none"], torch.tensor([3, 1, 2, 14, 4]),
                               lengths=torch.tensor([1, 1, 1, 0, 2, 0]), stride_per_key_per_rank=[[1], [3], [1], [1]],
                               inverse_indices=(["user", "item", "hist", "none"], torch.zeros(4, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"feature 'hist' \(table 't_item'\): id 14 in sample 0 is out of range"):
        ebc(kjt)


def test_vbe_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) through a VBE batch, forward and backward. The strides
    are part of the KJT's pytree context, so a batch of new strides compiles anew."""
    gen = torch.Generator().manual_seed(7)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs)
    twin = copy.deepcopy(ebc)
    compiled = torch.compile(ebc, fullgraph=True)
    keys = ["user", "item", "hist", "none"]
    for batch in (6, 6):  # the second batch reuses the graph
        kjt, ref = random_vbe(gen, keys, key_rows(configs), batch, _bags(batch))
        out = compiled(kjt).values()
        assert_close(out, reference_pooled(twin, ref), what=f"compiled VBE forward, batch {batch}")
        grad_out = torch.randn(out.shape, generator=gen)
        (out * grad_out).sum().backward()
        (twin(_expanded_kjt(keys, ref)).values() * grad_out).sum().backward()
        for c in configs:
            assert_close(table_grad(ebc, c.name), table_grad(twin, c.name), what=f"compiled VBE gradient {c.name}")
        ebc.zero_grad(), twin.zero_grad()


def _with_inverse(kjt: jr.KeyedJaggedTensor, table: torch.Tensor) -> jr.KeyedJaggedTensor:
    """``kjt`` with other inverse indices (VBE or not, as ``kjt``)."""
    spkpr = kjt.stride_per_key_per_rank() if kjt.variable_stride_per_key() else None
    return jr.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths(), stride_per_key_per_rank=spkpr,
                                inverse_indices=(kjt.keys(), table))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_vbe_refuses_inverse_indices_outside_their_bags(compiler):
    """Compiled (the default validate=True), an inverse index outside its key's ``B_k`` bags
    raises a RuntimeError naming the feature, where eager raises a ValueError; unchecked, one
    below the widest key's ``B'`` read an empty padding slot (zeros), a negative one wrapped
    under Inductor, and the rest failed without naming the feature. One compiled module, two
    graphs (VBE, and inverse indices on a plain KJT, whose B is a symbol)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(12)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs, backend="torch")
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(ebc, backend=counter, fullgraph=True)
    keys = ["hist", "user", "none", "item"]
    batch = 6  # B_k: user 1, item 6, hist 3 (t_item, as item), none 3; the widest, B', is 6
    kjt, ref = random_vbe(gen, keys, key_rows(configs), batch, _bags(batch), empty_keys=())
    assert_close(compiled(kjt).values(), reference_pooled(ebc, ref), what="a good VBE batch, compiled")
    plain, plain_ref = random_vbe(gen, keys, key_rows(configs), 4, {k: 3 for k in keys}, empty_keys=())
    plain = jr.KeyedJaggedTensor(keys, plain.values(), lengths=plain.lengths(), inverse_indices=plain.inverse_indices())
    assert_close(compiled(plain).values(), reference_pooled(ebc, plain_ref), what="inverse indices on a plain KJT")
    # (KJT, feature, index, its bags, the compiled message's bags: unknown to a plain KJT's graph)
    cases = [(kjt, "user", 1, 1, "1 bags"), (kjt, "hist", 5, 3, "3 bags"), (kjt, "hist", -1, 3, "3 bags"),
             (kjt, "item", 6, 6, "6 bags"), (kjt, "none", 1000, 3, "3 bags"), (plain, "item", 3, 3, "bags"),
             (plain, "user", -2, 3, "bags")]
    for source, feature, index, bags, where in cases:
        table = source.inverse_indices()[1].clone()
        table[keys.index(feature), 2] = index
        bad = _with_inverse(source, table)
        # eager first: it fills the KJT's cached stride, which the graph must not guard on
        with pytest.raises(ValueError, match=rf"feature '{feature}': inverse_indices hold {index}, outside its "
                                             rf"{bags} bags \[0, {bags}\)"):
            ebc(bad)
        with pytest.raises(RuntimeError, match=rf"feature '{feature}': inverse_indices outside its {where}"):
            compiled(bad)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_float_or_bool_inverse_indices_are_refused():
    """Bag numbers must be integers: a float table was truncated (1.9 read as bag 1) and a
    bool one read as bags 0 and 1. A TypeError, eagerly (validate or not) and compiled."""
    configs = _configs()
    keys = ["user", "item", "hist", "none"]
    kjt = jr.KeyedJaggedTensor(keys, torch.tensor([3, 1, 2, 4, 0, 2]), lengths=torch.tensor([1, 1, 1, 1, 1, 0, 1, 0]),
                               stride_per_key_per_rank=[[1], [2], [2], [3]],
                               inverse_indices=(keys, torch.tensor([[0, 0], [0, 1], [1, 0], [2, 1]])))
    ebc = jr.EmbeddingBagCollection(configs, backend="torch")
    unchecked = jr.EmbeddingBagCollection(configs, backend="torch", validate=False)
    expected = ebc(kjt).values()
    message = r"inverse_indices \(features \['user', 'item', 'hist', 'none'\]\) must be an integer tensor"
    torch._dynamo.reset()
    # fullgraph=False: Dynamo then lets the TypeError out; with fullgraph=True it reports it (as
    # every check on dtypes and shapes) as an Unsupported "Observed exception" quoting it
    compiled = torch.compile(ebc, backend="aot_eager")
    assert_close(compiled(kjt).values(), expected, what="integer inverse indices, compiled")
    for bad in (torch.tensor([[0.0, 0.0], [0.0, 1.9], [1.0, 0.0], [2.0, 1.0]]), kjt.inverse_indices()[1].bool()):
        for module in (ebc, unchecked, compiled):
            with pytest.raises(TypeError, match=message):
                module(_with_inverse(kjt, bad))
    torch._dynamo.reset()
