"""The quantized forward's short-bag kernel (kernels/quant_fwd_short.py) under the interpreter.

Batches of about one id per bag take a persistent, pipelined launch per storage type, and the
general kernel's pass for the bags longer than SHORT. Every case is checked against a float64
loop over the dequantized rows (``quant.rowwise.dequantize_rows``, the torch path's reading
of the stored bytes, not the kernels') and, bit for bit, against the general kernel alone
(``JAGGEDREC_SHORT_BAGS=0``), which adds the same fp32 terms in the same order.
"""

import pytest
import torch
from jaggedrec.kernels import quant_fwd, quant_fwd_short

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType

pytestmark = pytest.mark.interpret

DIMS = {"t0": 8, "t1": 3, "t2": 64, "t3": 1, "t4": 128}
TYPES = {"t0": DataType.INT8, "t1": DataType.INT4, "t2": DataType.INT4, "t3": DataType.FP16, "t4": DataType.INT8}
ROWS = 11


def _module(weighted, dims=DIMS):
    torch.manual_seed(3)
    configs = [jr.EmbeddingBagConfig(name=t, embedding_dim=d, num_embeddings=ROWS, feature_names=[f"f{t[1]}"],
                                     pooling=jr.PoolingType.MEAN if t == "t1" else jr.PoolingType.SUM)
               for t, d in dims.items()]
    configs[0].feature_names.append("g")  # two features of one table
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted)
    with torch.no_grad():
        for c in ebc.embedding_bag_configs():
            w = ebc.embedding_bags[c.name].weight
            w.mul_(torch.rand(w.shape[0], 1) * 4 + 0.1).add_(torch.randn(w.shape[0], 1))
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8, {t: TYPES[t] for t in dims}, row_align=16,
                                                backend="triton", validate=False)
    return q


def _batch(keys, lengths, gen, weighted, id_dtype, bad=False):
    n = int(lengths.sum())
    values = torch.randint(0, ROWS, (n,), generator=gen)
    if bad and n > 3:
        values[[1, n - 2]] = torch.tensor([ROWS + 4, -1])
    weights = torch.rand(n, generator=gen) * 2 - 0.5 if weighted else None
    return jr.KeyedJaggedTensor(keys, values.to(id_dtype), weights, lengths=lengths.to(id_dtype))


def _reference(q, kjt):
    """float64 pooling of the stored rows, dequantized by the torch path's reader."""
    from jaggedrec.quant.rowwise import dequantize_rows
    per_key = kjt.to_dict()
    out = []
    for t, c in enumerate(q.embedding_bag_configs()):
        rows = dequantize_rows(q.table_rows(t), c.data_type, c.embedding_dim).double()
        for feature in c.feature_names:
            jt = per_key[feature]
            values, lengths = jt.values().long(), jt.lengths()
            weights = jt.weights_or_none()
            pooled = torch.zeros(lengths.shape[0], c.embedding_dim, dtype=torch.float64)
            start = 0
            for b, n in enumerate(lengths.tolist()):
                for i in range(start, start + n):
                    if 0 <= values[i] < rows.shape[0]:
                        pooled[b] += rows[values[i]] * (1.0 if weights is None else float(weights[i]))
                if c.pooling == jr.PoolingType.MEAN and n:
                    pooled[b] /= n
                start += n
            out.append(pooled)
    return torch.cat(out, dim=1)


def _launches(monkeypatch):
    """Count the two kernels' launches (short per storage type, general with its SHORT)."""
    seen = []
    short, general = quant_fwd_short.quant_fwd_short, quant_fwd.quant_fwd

    def counted_short(*args, **kwargs):
        seen.append(("short", args[8]))
        return short(*args, **kwargs)

    def counted_general(*args, **kwargs):
        seen.append(("general", args[-1] if len(args) > 8 else kwargs.get("short", 0)))
        return general(*args, **kwargs)
    monkeypatch.setattr(quant_fwd_short, "quant_fwd_short", counted_short)
    monkeypatch.setattr(quant_fwd, "quant_fwd", counted_general)
    return seen


CASES = {
    # one id per bag, some empty bags: SHORT 1
    "one id": lambda gen, k, b: torch.randint(0, 2, (k * b,), generator=gen),
    # up to two ids, a few bags of 5: SHORT 2 (MEAN over two ids) with long bags for the second pass
    "mixed": lambda gen, k, b: torch.where(torch.rand(k * b, generator=gen) < 0.1, 5,
                                           torch.randint(0, 3, (k * b,), generator=gen)),
}


@pytest.mark.parametrize("case,weighted,id_dtype", [("one id", False, torch.int64), ("one id", True, torch.int32),
                                                     ("mixed", True, torch.int64), ("mixed", False, torch.int32)])
def test_short_bags_match_the_general_kernel_bit_for_bit(monkeypatch, weighted, case, id_dtype):
    q = _module(weighted)
    gen = torch.Generator().manual_seed(5)
    keys = ["f4", "g", "f1", "f0", "f3", "f2"]  # shuffled against the tables' order
    batch = 7
    kjt = _batch(keys, CASES[case](gen, len(keys), batch), gen, weighted, id_dtype)
    seen = _launches(monkeypatch)
    out = q(kjt).values()
    assert sorted(s for kind, s in seen if kind == "short") == [1, 2, 3], seen  # one launch per storage type
    assert ("general", 1 if case == "one id" else 2) in seen, seen
    torch.testing.assert_close(out.double(), _reference(q, kjt), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("JAGGEDREC_SHORT_BAGS", "0")
    seen.clear()
    general = q(kjt).values()
    assert seen == [("general", 0)], seen
    assert torch.equal(out, general), (out - general).abs().max()


def test_bad_ids_are_counted_for_their_feature(monkeypatch, feature="g"):
    """The short kernel counts a bad id into its feature's entry (QMETA_FEATURE), which the
    op turns into an error naming that feature: an INT4 table's, and a table's second feature."""
    q = _module(False)
    keys = ["f0", "g", "f1", "f2", "f3", "f4"]
    lengths = torch.ones(len(keys) * 4, dtype=torch.int64)
    values = torch.randint(0, ROWS, (len(keys) * 4,), generator=torch.Generator().manual_seed(6))
    values[keys.index(feature) * 4 + 2] = ROWS + 3
    seen = _launches(monkeypatch)
    with pytest.raises(ValueError, match=f"'{feature}'"):
        q(jr.KeyedJaggedTensor(keys, values, lengths=lengths))
    assert ("general", 1) in seen and len([s for s in seen if s[0] == "short"]) == 3, seen


def test_wide_dims_keep_the_general_kernel(monkeypatch):
    q = _module(False, dict(DIMS, t4=130))
    gen = torch.Generator().manual_seed(7)
    keys = ["f0", "g", "f1", "f2", "f3", "f4"]
    kjt = _batch(keys, torch.ones(len(keys) * 3, dtype=torch.int64), gen, False, torch.int64)
    seen = _launches(monkeypatch)
    out = q(kjt).values()
    assert seen == [("general", 0)], seen
    torch.testing.assert_close(out.double(), _reference(q, kjt), rtol=1e-5, atol=1e-5)
