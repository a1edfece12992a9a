"""The fused optimizers FBGEMM's TBE and TorchRec's sharders name, reached the ways TorchRec
users reach them: ``fused_params`` (``EmbOptimType`` or its name), an optimizer applied in
the backward (``torch.optim.Adagrad``; TorchRec's placeholders ``LarsSGD``,
``PartialRowWiseAdam``, ``Adagrad``, from TorchRec when installed and from
``jaggedrec.optim.optimizers``), and sharded training against one unsharded module."""

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

import jaggedrec as jr
import sharding_cases
from distributed_harness import run_ranks
from jaggedrec import optim
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.fused_params import EmbOptimType, fused_optimizer_from_params
from jaggedrec.optim import optimizers as placeholders


def _ebc():
    return jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8,
                                                            feature_names=["f"])])


def _in_backward(cls, kwargs):
    ebc = _ebc()
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)
    return EmbeddingBagCollectionSharder().shard_optimizer(ebc)


def test_fused_params_name_the_new_optimizers():
    assert fused_optimizer_from_params({"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.3,
                                        "eps": 1e-4}) == optim.Adagrad(0.3, eps=1e-4)
    # FBGEMM's defaults for what is left out (eta 1e-3, momentum 0.9, betas 0.9 / 0.999, eps 1e-8)
    assert fused_optimizer_from_params({"optimizer": "lars_sgd", "learning_rate": 0.2, "weight_decay": 0.1}) == \
        optim.LarsSGD(0.2, eta=1e-3, momentum=0.9, weight_decay=0.1)
    assert fused_optimizer_from_params({"optimizer": "PARTIAL_ROWWISE_ADAM", "beta1": 0.5}) == \
        optim.PartialRowWiseAdam(0.01, betas=(0.5, 0.999), eps=1e-8)
    assert fused_optimizer_from_params({"optimizer": EmbOptimType.LAMB, "weight_decay": 0.1}) == \
        optim.LAMB(0.01, eps=1e-8, weight_decay=0.1)
    assert fused_optimizer_from_params({"optimizer": "partial_row_wise_lamb", "learning_rate": 0.2}) == \
        optim.PartialRowWiseLAMB(0.2)
    # FBGEMM's gradient clipping: off unless gradient_clipping, then max_gradient (default 1.0)
    assert fused_optimizer_from_params({"optimizer": "LAMB", "max_gradient": 2.0}).max_gradient is None
    assert fused_optimizer_from_params({"optimizer": "LAMB", "gradient_clipping": True}).max_gradient == 1.0
    assert fused_optimizer_from_params({"optimizer": "EXACT_SGD", "gradient_clipping": True,
                                        "max_gradient": 0.5}) == optim.SGD(0.01, max_gradient=0.5)
    with pytest.raises(ValueError, match="max_gradient must be > 0"):
        optim.RowWiseAdagrad(0.1, max_gradient=0.0)
    assert optim.RowWiseAdagrad(0.1, 1e-3).eps == 1e-3  # max_gradient is keyword-only: positions unchanged
    # FBGEMM's WeightDecayMode for row-wise Adagrad: NONE drops the weight decay, DECOUPLE decays apart
    assert fused_optimizer_from_params({"optimizer": "EXACT_ROWWISE_ADAGRAD", "weight_decay": 0.1,
                                        "weight_decay_mode": "DECOUPLE"}) == \
        optim.RowWiseAdagrad(0.01, weight_decay=0.1, weight_decay_mode="decouple")
    assert fused_optimizer_from_params({"optimizer": "EXACT_ROWWISE_ADAGRAD", "weight_decay": 0.1,
                                        "weight_decay_mode": "NONE"}).weight_decay == 0.0
    with pytest.raises(ValueError, match="DECOUPLE_GLOBAL is not fused"):
        fused_optimizer_from_params({"optimizer": "EXACT_ROWWISE_ADAGRAD", "weight_decay_mode": "DECOUPLE_GLOBAL"})
    with pytest.raises(ValueError, match="DECOUPLE is not fused by jaggedrec for LAMB"):
        fused_optimizer_from_params({"optimizer": "LAMB", "weight_decay_mode": "DECOUPLE"})
    with pytest.raises(ValueError, match="weight_decay_mode must be"):
        optim.RowWiseAdagrad(0.1, weight_decay_mode="l1")
    with pytest.raises(ValueError, match="EXACT_ADAGRAD takes no weight_decay"):
        fused_optimizer_from_params({"optimizer": "EXACT_ADAGRAD", "weight_decay": 0.1})
    with pytest.raises(ValueError, match="not fused by jaggedrec"):
        fused_optimizer_from_params({"optimizer": "SHAMPOO"})
    with pytest.raises(ValueError, match="betas"):
        fused_optimizer_from_params({"optimizer": "PARTIAL_ROWWISE_ADAM", "beta2": 1.0})


def test_in_backward_torch_adagrad_is_fused_as_exact_adagrad():
    assert _in_backward(torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-3, "weight_decay": 0.01}) == \
        optim.Adagrad(0.05, eps=1e-3, weight_decay=0.01)
    assert _in_backward(torch.optim.Adagrad, {}) == optim.Adagrad(1e-2, eps=1e-10)  # torch's defaults
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        _in_backward(torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5})


def _placeholder_sources():
    sources = [pytest.param(placeholders, id="jaggedrec")]
    try:
        import torchrec.optim.optimizers as torchrec_placeholders
        sources.append(pytest.param(torchrec_placeholders, id="torchrec"))
    except ImportError:
        sources.append(pytest.param(None, id="torchrec", marks=pytest.mark.skip(reason="torchrec not installed")))
    return sources


@pytest.mark.parametrize("source", _placeholder_sources())
def test_in_backward_placeholders_take_fbgemm_kwargs(source):
    assert _in_backward(source.LarsSGD, {"lr": 0.2, "eta": 0.5, "momentum": 0.5}) == \
        optim.LarsSGD(0.2, eta=0.5, momentum=0.5)
    assert _in_backward(source.PartialRowWiseAdam, {"lr": 0.1, "beta1": 0.8, "weight_decay": 0.01}) == \
        optim.PartialRowWiseAdam(0.1, betas=(0.8, 0.999), weight_decay=0.01)
    assert _in_backward(source.Adagrad, {"learning_rate": 0.3}) == optim.Adagrad(0.3, eps=1e-8)
    assert _in_backward(source.LAMB, {"lr": 0.1, "beta2": 0.9}) == optim.LAMB(0.1, betas=(0.9, 0.9))
    assert _in_backward(source.PartialRowWiseLAMB, {"lr": 0.1, "eps": 1e-3}) == \
        optim.PartialRowWiseLAMB(0.1, eps=1e-3)
    with pytest.raises(ValueError, match="does not know the keys"):
        _in_backward(source.LarsSGD, {"lr": 0.2, "nesterov": True})


def test_placeholders_never_step():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="fused backward"):
        placeholders.LarsSGD([p], lr=0.1).step()


def test_column_wise_shards_are_refused_for_whole_row_optimizers():
    from jaggedrec.distributed.shard_layout import EXCHANGE
    from jaggedrec.distributed.shards import check_fused

    class Layout:  # one table split column-wise over two ranks
        configs = [jr.EmbeddingBagConfig(name="wide", embedding_dim=8, num_embeddings=4, feature_names=["f"])]
        table_shards = [[type("Shard", (), dict(row_split=False, kind=EXCHANGE))()] * 2]

    for fused in (optim.LarsSGD(0.1), optim.PartialRowWiseAdam(0.1), optim.LAMB(0.1), optim.PartialRowWiseLAMB(0.1)):
        with pytest.raises(NotImplementedError, match=rf"\['wide'\]: {type(fused).__name__}"):
            check_fused(Layout, fused)
    check_fused(Layout, optim.Adagrad(0.1))  # element-wise: column shards step exactly


def test_sharded_training_matches_one_unsharded_module():
    """Three steps of each new optimizer on two gloo ranks (table-, row-, column-wise and mixed
    shards; whole-row optimizers without column-wise ones) against the unsharded module."""
    modes = ("adagrad", "lars_sgd", "partial_rowwise_adam", "lamb", "partial_rowwise_lamb")
    assert run_ranks(sharding_cases.train_cases, 2, modes, timeout=420) == [list(modes)] * 2


def test_config_repr_shows_max_gradient_only_where_it_clips():
    from jaggedrec.optim import fused

    # the tutorial prints the sharded module's fused optimizer: unclipped configs read as before
    assert repr(fused.RowWiseAdagrad(lr=0.02, eps=0.002)).startswith("RowWiseAdagrad(lr=0.02, eps=0.002, ")
    assert repr(fused.SGD(lr=0.5)) == "SGD(lr=0.5)"
    assert "max_gradient=0.25" in repr(fused.LAMB(lr=0.1, max_gradient=0.25))
    assert fused.Adam(lr=0.1, max_gradient=1.0) != fused.Adam(lr=0.1)
