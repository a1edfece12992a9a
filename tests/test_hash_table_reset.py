"""The fresh values of evicted rows (``hash_probe_torch.fresh_uniform``, a counter-based draw
keyed by (seed, step, table, row, column)): their distribution against the uniform law (moments,
Kolmogorov-Smirnov, bins, correlation between columns and between rows), their determinism, and
that a HashEmbeddingBagCollection gives an evicted row the same values whether the eager step
compacts or runs on fixed shapes, reproducibly under torch.manual_seed."""

import math
import random

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops import hash_probe_torch as hp

STEP = torch.tensor([7])


def draw(rows=40_000, dim=24, seed=123, step=STEP, table=1):
    row = torch.arange(rows, dtype=torch.int64) * 3 + 5
    return hp.fresh_uniform(seed, step, torch.full_like(row, table), row, dim)


def test_fresh_values_are_uniform():
    u = draw().double()
    n = u.numel()
    assert u.dtype == torch.float64 and bool((u >= 0).all()) and bool((u < 1).all())
    # moments within 5 sigma of the uniform law's (mean 1/2, variance 1/12)
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # Kolmogorov-Smirnov against x, at a 1e-6 level
    flat = u.flatten().sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(grid - flat, flat - (grid - 1 / n)).max().item()
    assert ks < math.sqrt(-math.log(1e-6 / 2) / (2 * n))
    # 64 bins of every column: chi-square per column well inside its tail (64 bins, 63 dof)
    counts = torch.stack([torch.histc(c, bins=64, min=0, max=1) for c in u.T])
    expected = u.shape[0] / 64
    chi2 = ((counts - expected) ** 2 / expected).sum(1)
    assert float(chi2.max()) < 63 + 8 * math.sqrt(2 * 63)
    # neighbouring columns and neighbouring rows uncorrelated
    centred = u - 0.5
    for a, b in ((centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:])):
        corr = (a * b).mean() / (1 / 12)
        assert abs(corr.item()) < 5 / math.sqrt(a.numel())


def test_fresh_values_are_keyed_by_seed_step_table_row_and_column():
    u = draw(rows=300, dim=16)
    assert torch.equal(u, draw(rows=300, dim=16))  # deterministic
    assert torch.equal(u[:, :5], draw(rows=300, dim=5))  # a column does not depend on dim
    row = torch.arange(300, dtype=torch.int64) * 3 + 5
    # a row's values do not depend on the other rows drawn with it, nor on their order
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hp.fresh_uniform(123, STEP, torch.ones_like(row), row[perm], 16), u[perm])
    for other in (draw(rows=300, dim=16, seed=124), draw(rows=300, dim=16, step=STEP + 1),
                  draw(rows=300, dim=16, table=2)):
        assert not bool((other == u).all(1).any())  # no row repeats another key's values
    assert len({tuple(r) for r in u.tolist()}) == 300  # nor another row's
    assert len(set(u.flatten().tolist())) > 0.99 * u.numel()


def _model(compaction: bool, fused=None, dims=(5, 3)):
    """Two hashed tables: h (init range [-0.3, 0.2]) and g (the default range); of one dim, the
    compact reset writes both at once (one storage group), per table otherwise."""
    tables = [jr.EmbeddingBagConfig(name="h", embedding_dim=dims[0], num_embeddings=9, feature_names=["a"],
                                    weight_init_min=-0.3, weight_init_max=0.2),
              jr.EmbeddingBagConfig(name="s", embedding_dim=2, num_embeddings=4, feature_names=["c"]),
              jr.EmbeddingBagConfig(name="g", embedding_dim=dims[1], num_embeddings=7, feature_names=["b"])]
    options = HashTableOptions(bucket_size=2, eviction="lru", unplaced="fallback")
    model = HashEmbeddingBagCollection(tables, {"h": options, "g": options}, backend="torch", fused_optimizer=fused)
    model.hash_state.eager_compaction = compaction
    return model


def _batches(count=12):
    rng = random.Random(4)
    out = []
    for _ in range(count):
        lengths = [rng.choice([0, 1, 2, 3]) for _ in range(6)]
        ids = [rng.randrange(-2**40, 2**40) for _ in range(sum(lengths))]
        lengths += [1, 0, 2]  # the static table's feature c: ids in [0, 4)
        ids += [rng.randrange(4) for _ in range(3)]
        out.append(jr.KeyedJaggedTensor(["a", "b", "c"], torch.tensor(ids), lengths=torch.tensor(lengths)))
    return out


@pytest.mark.parametrize("dims", [(5, 3), (4, 4)], ids=["per_table", "one_write"])
@pytest.mark.parametrize("fused", [None, optim.Adam(lr=0.1), optim.RowWiseAdagrad(lr=0.1)],
                         ids=["dense", "adam", "rowwise_adagrad"])
def test_evicted_rows_same_values_compacted_or_fixed_shapes(fused, dims):
    torch.manual_seed(9)
    compact = _model(True, fused, dims)
    torch.manual_seed(9)  # the same seed: the same tables and the same reset_seed
    fixed = _model(False, fused, dims)
    torch.manual_seed(10)  # another seed, the same tables: other fresh values for the same evictions
    other = _model(True, fused, dims)
    other.load_state_dict(compact.state_dict())
    assert compact.reset_seed == fixed.reset_seed != other.reset_seed
    evictions = 0
    for kjt in _batches():
        keys = compact.hash_state.keys.clone()
        for m in (compact, fixed, other):
            m(kjt).values().square().sum().backward()
        for t in range(3):
            assert torch.equal(compact.table_weight(t), fixed.table_weight(t)), t
        for name, value in fixed.fused_optimizer_state.state_dict().items():
            assert torch.equal(compact.fused_optimizer_state.state_dict()[name], value), name
        assert torch.equal(compact.hash_state.keys, other.hash_state.keys)
        evictions += int(((keys != compact.hash_state.keys) & (keys != hp.EMPTY)).sum())
        if fused is None:  # untrained: every row, fresh or initial, in h's init range
            assert bool(((compact.table_weight(0) >= -0.3) & (compact.table_weight(0) <= 0.2)).all())
    assert evictions > 10
    assert not torch.equal(compact.table_weight(0), other.table_weight(0))
