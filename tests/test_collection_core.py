"""One core for every collection: the float bag and sequence collections and the quantized bag
collection share the layout (configs, name checks, ``feature@table`` naming), the input checks'
feature spec, the per-table views and ``state_dict`` entries, and bad-id reporting; only the
storage differs. Expected values come from the configs and the documented row layouts, not
from the modules."""

import pytest
import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.collection import TableCollection
from jaggedrec.modules.table_layout import TableLayout

QUANT_TYPES = (jr.DataType.INT8, jr.DataType.INT4, jr.DataType.FP16)


def _configs(cls, data_types=(jr.DataType.FP32,) * 4):
    # a shared feature (f2, read by t0 and t1), odd dims, dims out of order
    spec = [("t0", 5, 7, ["f1", "f2"]), ("t1", 3, 4, ["f2"]), ("t2", 5, 9, ["f3"]), ("t3", 2, 6, ["f4"])]
    return [cls(name=n, embedding_dim=d, num_embeddings=r, feature_names=f, data_type=t)
            for (n, d, r, f), t in zip(spec, data_types)]


def _modules():
    mixed = (jr.DataType.INT8, jr.DataType.FP16, jr.DataType.INT4, jr.DataType.INT8)
    return [jr.EmbeddingBagCollection(_configs(jr.EmbeddingBagConfig)),
            jr.EmbeddingCollection(_configs(jr.EmbeddingConfig)),
            quant.EmbeddingBagCollection(_configs(jr.EmbeddingBagConfig, mixed))]


def test_every_collection_stands_on_one_core():
    for module in _modules():
        assert isinstance(module, TableCollection) and isinstance(module.layout, TableLayout)
        assert module.layout.embedding_names == ["f1", "f2@t0", "f2@t1", "f3", "f4"]
        assert module.layout.embedding_dims() == [5, 5, 3, 5, 2]
        assert module.feature_spec.key_rows == {"f1": 7, "f2": 4, "f3": 9, "f4": 6}
        assert module.feature_spec.key_tables["f2"] == ["t0", "t1"]
        for t, name in enumerate(["t0", "t1", "t2", "t3"]):
            view = module.embedding_bags[name] if hasattr(module, "embedding_bags") else module.embeddings[name]
            assert view.weight.data_ptr() == module.table_weight(t).data_ptr()
            assert (view.num_embeddings, view.embedding_dim) == (module.layout.configs[t].num_embeddings,
                                                                 module.layout.configs[t].embedding_dim)


@pytest.mark.parametrize("make,error,match", [
    (lambda cls: [cls(name="a", embedding_dim=2, num_embeddings=3), cls(name="a", embedding_dim=4,
                                                                        num_embeddings=5)],
     ValueError, r"duplicate table names: \['a'\]"),
    (lambda cls: [jr.EmbeddingConfig(name="a", embedding_dim=2, num_embeddings=3)], TypeError,
     "tables must be EmbeddingBagConfig, got EmbeddingConfig"),
])
def test_config_checks_are_the_same_for_float_and_quantized(make, error, match):
    def quantized(configs):
        for c in configs:
            c.data_type = jr.DataType.INT8
        return quant.EmbeddingBagCollection(configs)

    for build in (jr.EmbeddingBagCollection, quantized):
        with pytest.raises(error, match=match):
            build(make(jr.EmbeddingBagConfig))


@pytest.mark.parametrize("row_align", [1, 4, 16])
def test_quantized_tables_lie_by_type_then_dim(row_align):
    """Each storage type's buffer holds its tables ordered by dim (config order among equal
    dims), back to back, rows of the documented size (INT8: dim + 8 bytes, INT4: ceil(dim/2) + 4,
    FP16: 2 * dim) rounded up to ``row_align``."""
    types = (jr.DataType.FP16, jr.DataType.INT8, jr.DataType.INT4, jr.DataType.INT8)
    q = quant.EmbeddingBagCollection(_configs(jr.EmbeddingBagConfig, types), row_align=row_align)
    sizes = {jr.DataType.INT8: lambda d: d + 8, jr.DataType.INT4: lambda d: (d + 1) // 2 + 4,
             jr.DataType.FP16: lambda d: 2 * d}
    buffers = {jr.DataType.INT8: q.qweights_int8, jr.DataType.INT4: q.qweights_int4, jr.DataType.FP16: q.qweights_fp16}
    configs = q.embedding_bag_configs()
    for data_type in QUANT_TYPES:
        members = sorted((i for i, c in enumerate(configs) if c.data_type == data_type),
                         key=lambda i: configs[i].embedding_dim)
        cursor = 0
        for i in members:
            stride = -(-sizes[data_type](configs[i].embedding_dim) // row_align) * row_align
            rows = q.table_rows(i)
            assert rows.shape == (configs[i].num_embeddings, stride)
            assert rows.data_ptr() - buffers[data_type].data_ptr() == cursor
            cursor += configs[i].num_embeddings * stride
        assert buffers[data_type].numel() == cursor


@pytest.mark.parametrize("bounds_check", ["raise", "clamp"])
def test_quantized_collection_reports_skipped_ids_as_the_float_one(bounds_check):
    """Counts a compiled Triton forward leaves in ``skipped_ids`` are reported by the shared
    ``check_skipped_ids``: a ValueError naming the feature under "raise", a warning under "clamp"."""
    q = quant.EmbeddingBagCollection(_configs(jr.EmbeddingBagConfig, (jr.DataType.INT8,) * 4),
                                     bounds_check=bounds_check)
    q.check_skipped_ids()  # nothing counted: silent
    q.skipped_ids[3] = 2  # the fourth output feature: f3
    if bounds_check == "raise":
        with pytest.raises(ValueError, match=r"EmbeddingBagCollection: ids outside their table.*'f3': 2"):
            q.check_skipped_ids()
    else:
        with pytest.warns(RuntimeWarning, match=r"'f3': 2"):
            q.check_skipped_ids()
    assert not q.skipped_ids.any()


def test_quantized_state_dict_is_one_entry_per_table_and_loads_back():
    q = quant.EmbeddingBagCollection.from_float(jr.EmbeddingBagCollection(_configs(jr.EmbeddingBagConfig)),
                                                 per_table_data_type={"t1": jr.DataType.INT4, "t3": jr.DataType.FP16})
    state = q.state_dict()
    assert list(state) == [f"embedding_bags.t{i}.weight" for i in range(4)]
    for t in range(4):
        assert torch.equal(state[f"embedding_bags.t{t}.weight"], q.table_rows(t))
    fresh = quant.EmbeddingBagCollection(q.embedding_bag_configs())
    fresh.load_state_dict(state)
    for t in range(4):
        assert torch.equal(fresh.table_rows(t), q.table_rows(t))
    state["embedding_bags.t1.weight"] = state["embedding_bags.t1.weight"].float()
    with pytest.raises(RuntimeError, match=r"size mismatch for embedding_bags.t1.weight: copying torch.float32 rows"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("module, message", [(jr.EmbeddingBagCollection, "nothing to pool"),
                                             (jr.EmbeddingCollection, "nothing to look up"),
                                             (quant.EmbeddingBagCollection, "nothing to pool")])
def test_a_collection_without_tables_builds_and_refuses_to_run(module, message):
    """TorchRec builds collections with no tables (a model's placeholder; its DLRM asserts on
    one); running one raises naming the problem, where TorchRec's fails inside torch.cat."""
    empty = module(tables=[])
    assert not list(empty.parameters()) and not any(t.numel() for t in empty.state_dict().values())
    kjt = jr.KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=f"has no tables: there is {message}"):
        empty(kjt)


def test_configs_have_torchrecs_fields_in_its_order():
    """Code that builds configs positionally or reads TorchRec's fields (need_pos,
    num_features(), get_weight_init_min(), ...) works; what jaggedrec lacks is refused."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(jr.EmbeddingBagConfig)]
    assert names[:16] == ["num_embeddings", "embedding_dim", "name", "data_type", "feature_names",
                          "weight_init_max", "weight_init_min", "num_embeddings_post_pruning", "init_fn", "need_pos",
                          "input_dim", "total_num_buckets", "use_virtual_table", "virtual_table_eviction_policy",
                          "enable_embedding_update", "stash_weights"]
    try:
        import torchrec
    except ImportError:
        torchrec = None
    if torchrec is not None:
        for ours, theirs in ((jr.EmbeddingBagConfig, torchrec.EmbeddingBagConfig),
                             (jr.EmbeddingConfig, torchrec.EmbeddingConfig)):
            theirs_names = [f.name for f in dataclasses.fields(theirs)]
            assert [f.name for f in dataclasses.fields(ours)] == [n for n in theirs_names if n in names + [
                "pooling"]], theirs_names
    c = jr.EmbeddingBagConfig(25, 4, "t", jr.DataType.FP32, ["a", "b"], need_pos=True, total_num_buckets=5)
    assert c.num_features() == 2 and c.need_pos and c.get_weight_init_min() == -0.2 and c.get_weight_init_max() == 0.2
    for field in ("use_virtual_table", "enable_embedding_update", "stash_weights"):
        with pytest.raises(NotImplementedError, match=f"table 't': {field}"):
            jr.EmbeddingBagConfig(num_embeddings=5, embedding_dim=4, name="t", **{field: True})
    with pytest.raises(NotImplementedError, match="num_embeddings_post_pruning"):
        jr.EmbeddingConfig(num_embeddings=5, embedding_dim=4, name="t", num_embeddings_post_pruning=3)
