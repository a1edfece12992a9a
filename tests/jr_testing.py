"""Shared test helpers: seeded random batches and an independent float64 reference.

The reference pools each feature with its own ``F.embedding_bag`` call over a float64 copy
of the table, one feature at a time, the way TorchRec's unsharded module loops over
``nn.EmbeddingBag``. It shares no code with jaggedrec's ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import jaggedrec as jr

# Tolerances against the float64 reference, by table dtype.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 what: str = "") -> None:
    """allclose with the dtype's tolerance; on failure, names the first differing index."""
    tol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, **tol)
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ; first at {first}: "
                             f"{actual[first].item()} vs expected {expected[first].item()}")


@dataclass
class Batch:
    kjt: jr.KeyedJaggedTensor
    per_key: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]  # values, lengths, weights


def random_kjt(gen: torch.Generator, keys: Sequence[str], rows: Dict[str, int], batch: int,
               max_len: int = 5, weighted: bool = False, empty_keys: Sequence[str] = (),
               id_dtype: torch.dtype = torch.int64, use_offsets: bool = False, one_hot: bool = False) -> Batch:
    """A KJT whose ids come from a small range per key, so duplicates are common.

    ``rows[key]`` bounds the ids of ``key``; ``empty_keys`` get no ids at all; some bags are
    empty in every key, unless ``one_hot``, where every bag has exactly one id.
    """
    per_key = {}
    for key in keys:
        if one_hot:
            lengths = torch.ones(batch, dtype=torch.int64)
        elif key in empty_keys:
            lengths = torch.zeros(batch, dtype=torch.int64)
        else:
            lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
            if batch > 1:
                lengths[torch.randint(0, batch, (1,), generator=gen)] = 0
        n = int(lengths.sum())
        span = max(1, min(rows[key], max(2, n // 2)))  # a narrow id range forces duplicates
        low = int(torch.randint(0, rows[key] - span + 1, (1,), generator=gen))
        values = torch.randint(low, low + span, (n,), generator=gen)
        weights = torch.rand(n, generator=gen) * 2 - 0.5 if weighted else None
        per_key[key] = (values, lengths, weights)
    values = torch.cat([per_key[k][0] for k in keys]).to(id_dtype)
    lengths = torch.cat([per_key[k][1] for k in keys]).to(id_dtype)
    weights = torch.cat([per_key[k][2] for k in keys]) if weighted else None
    if use_offsets:
        offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
        kjt = jr.KeyedJaggedTensor(list(keys), values, weights, offsets=offsets)
    else:
        kjt = jr.KeyedJaggedTensor(list(keys), values, weights, lengths=lengths)
    return Batch(kjt, per_key)


def reference_pooled(ebc: jr.EmbeddingBagCollection, batch: Batch,
                     tables64: Optional[List[torch.Tensor]] = None,
                     weights64: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """``[B, total_dim]`` float64, one F.embedding_bag per feature over float64 tables."""
    configs = ebc.embedding_bag_configs()
    if tables64 is None:
        tables64 = [ebc.embedding_bags[c.name].weight.detach().double() for c in configs]
    outs = []
    for t, c in enumerate(configs):
        for feature in c.feature_names:
            values, lengths, weights = batch.per_key[feature]
            psw = None
            if weights is not None:
                psw = weights64[feature] if weights64 is not None else weights.double()
            offsets = F.pad(lengths.cumsum(0), (1, 0))
            pooled = F.embedding_bag(values.long(), tables64[t], offsets, mode="sum",
                                     per_sample_weights=psw, include_last_offset=True)
            if c.pooling == jr.PoolingType.MEAN:
                pooled = pooled / lengths.clamp(min=1).double().unsqueeze(1)
            outs.append(pooled)
    return torch.cat(outs, dim=1)


def random_configs(gen: torch.Generator, dims: Sequence[int], data_type=jr.DataType.FP32,
                   mean_every: int = 3, shared: bool = True) -> List[jr.EmbeddingBagConfig]:
    """Tables with the given dims, varied row counts, some MEAN, and (if ``shared``) one
    feature read by two tables."""
    configs = []
    for i, dim in enumerate(dims):
        features = [f"f{i}"] + ([f"g{i}"] if i % 2 else [])
        if shared and i == len(dims) - 1 and len(dims) > 1:
            features.append("f0")
        configs.append(jr.EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=dim, num_embeddings=int(torch.randint(3, 40, (1,), generator=gen)),
            feature_names=features, data_type=data_type,
            pooling=jr.PoolingType.MEAN if i % mean_every == 1 else jr.PoolingType.SUM))
    return configs


def key_rows(configs: Sequence[jr.EmbeddingBagConfig]) -> Dict[str, int]:
    rows: Dict[str, int] = {}
    for c in configs:
        for f in c.feature_names:
            rows[f] = min(rows.get(f, c.num_embeddings), c.num_embeddings)
    return rows


def shuffled_keys(gen: torch.Generator, keys: Sequence[str]) -> List[str]:
    """The keys in an order that differs from the given one (for at least two keys)."""
    keys = list(keys)
    if len(keys) < 2:
        return keys
    while True:
        order = torch.randperm(len(keys), generator=gen).tolist()
        if order != list(range(len(keys))):
            return [keys[i] for i in order]


DTYPES = {jr.DataType.FP32: torch.float32, jr.DataType.FP16: torch.float16, jr.DataType.BF16: torch.bfloat16}


def table_grad(ebc: jr.EmbeddingBagCollection, name: str) -> torch.Tensor:
    """The gradient of one table, read from its flat parameter's gradient."""
    view = ebc.embedding_bags[name].weight
    flat = next(p for p in ebc.parameters() if p.dtype == view.dtype)
    grad = flat.grad.to_dense() if flat.grad.is_sparse else flat.grad
    return grad[view.storage_offset():view.storage_offset() + view.numel()].view_as(view)


def check_module(seed: int, dims: Sequence[int], weighted: bool, data_type=jr.DataType.FP32, batch: int = 5,
                 id_dtype: torch.dtype = torch.int64, use_offsets: bool = False, extra_key: bool = True,
                 one_hot: bool = False, max_len: int = 5, device: str = "cpu", **module_kwargs):
    """Build a random collection and batch, and check the forward and every gradient
    against the float64 reference. The KJT's keys are shuffled, include a key no table
    reads, and one configured feature has no ids. Returns ``(ebc, output)``."""
    gen = torch.Generator().manual_seed(seed)
    configs = random_configs(gen, dims, data_type)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted, device=device, **module_kwargs)
    rows = key_rows(configs)
    keys = shuffled_keys(gen, list(rows) + (["unused"] if extra_key else []))
    rows["unused"] = 1000
    empty = [k for k in keys if k != "f0"][:1]
    b = random_kjt(gen, keys, rows, batch, max_len=max_len, weighted=weighted, empty_keys=empty,
                   id_dtype=id_dtype, use_offsets=use_offsets, one_hot=one_hot)
    kjt = b.kjt.to(torch.device(device))
    if weighted:
        kjt.weights().requires_grad_(True)

    out = ebc(kjt)
    tables64 = [ebc.embedding_bags[c.name].weight.detach().cpu().double().requires_grad_() for c in configs]
    weights64 = {k: v[2].double().requires_grad_() for k, v in b.per_key.items()} if weighted else None
    ref = reference_pooled(ebc, b, tables64, weights64)
    dtype = DTYPES[data_type]
    assert out.values().dtype == torch.float32
    expected_keys = [f"{f}@{c.name}" if f == "f0" and len(dims) > 1 else f for c in configs for f in c.feature_names]
    assert out.keys() == expected_keys
    assert_close(out.values().cpu(), ref, dtype, "forward")

    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.values().double() * upstream.to(device)).sum().backward()
    (ref * upstream).sum().backward()
    for c, t64 in zip(configs, tables64):
        assert_close(table_grad(ebc, c.name).cpu(), t64.grad, dtype, f"grad of {c.name}")
    if weighted:
        # ids of keys no table reads get a zero gradient
        expected = torch.cat([torch.zeros_like(weights64[k]) if weights64[k].grad is None else weights64[k].grad
                              for k in keys])
        assert_close(kjt.weights().grad.cpu(), expected, dtype, "grad of per-id weights")
    return ebc, out
