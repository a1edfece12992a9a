"""The train pipelines on gloo ranks (bodies in ``train_pipeline_cases.py``): bit-identical
to training without a pipeline, the semi-sync pipeline against its definition, failures
that end cleanly on every rank, and the batches held at once. One launch per world size (a
spawn costs seconds); every launch has a deadline."""

import pytest

import sharding_cases
from distributed_harness import run_ranks

CASES = "train_pipeline_cases"


def _cases(world, *calls, timeout=240):
    results = run_ranks(sharding_cases.run_cases, world, list(calls), timeout=timeout, collective_timeout=60)
    return [[rank_results[i] for rank_results in results] for i in range(len(calls))]


def _check_memory(report, world):
    """At most the stage count of batches (2 for the base pipeline, 3 for the sparse-dist
    one), never more than that many of the largest batch's bytes."""
    for what, stats in report[0].items():
        stages = 2 if "TrainPipelineBase" in what else 3
        assert stats["peak_batches"] == stages, (what, stats)
        assert stats["peak_batch_bytes"] <= stages * stats["biggest_batch_bytes"], (what, stats)
    print(f"world {world}: batches held at the peak (rank 0): {report[0]}")


def test_pipelines_on_two_ranks():
    """20 steps bit-identical to the plain loop (fused SGD/Adam/row-wise Adagrad, TW/RW/CW/
    TWRW/DP tables, DDP dense part, a VBE KJT, a model that changes the EC's KJT: counted
    fallbacks); semi-sync against its definition; failures and the end of the data; the
    input dists' all-to-alls outside the model's forward."""
    report, semi, failures, _ = _cases(2, (CASES, "equal_training_cases"), (CASES, "semi_sync_cases"),
                                       (CASES, "failure_cases"), (CASES, "overlap_cases"))
    _check_memory(report, 2)
    assert semi == [["semi_sync/0", "semi_sync/4", "semi_sync/ec_falls_back"]] * 2
    assert failures[0][:2] == ["raise/TrainPipelineSparseDist/RuntimeError", "raise/TrainPipelineSemiSync/RuntimeError"]
    # the bad id is on rank 1: it raises its own error, rank 0 learns of it
    assert failures[0][2:4] == ["bad_id/TrainPipelineSparseDist/BatchRejected",
                                "bad_id/TrainPipelineSemiSync/BatchRejected"]
    assert failures[1][2:4] == ["bad_id/TrainPipelineSparseDist/ValueError", "bad_id/TrainPipelineSemiSync/ValueError"]
    assert failures[0][4:] == failures[1][4:] == ["end_of_data", "one_rank_modifies", "changed_in_place"]


@pytest.mark.parametrize("world", [3])
def test_pipelines_on_three_ranks(world):
    report, semi = _cases(world, (CASES, "equal_training_cases"), (CASES, "semi_sync_cases"))
    _check_memory(report, world)
    assert semi == [["semi_sync/0", "semi_sync/4", "semi_sync/ec_falls_back"]] * world


# --- in one process: the call shape, TorchRec's names, refused options --------------------
import torch  # noqa: E402
from torch import nn  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self, raise_on=-1):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.calls, self.raise_on = nn.Linear(3, 1), 0, raise_on

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.raise_on:
            raise RuntimeError("step fails")
        x, y = batch
        loss = ((self.lin(x).squeeze(1) - y) ** 2).mean()
        return loss, loss.detach()


def _tiny_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, generator=g)) for _ in range(n)]


class _Pair(tuple):
    def to(self, device, non_blocking=False):
        return _Pair(t.to(device, non_blocking=non_blocking) for t in self)


def test_exported_where_torchrec_has_them():
    import jaggedrec.distributed as jd
    from jaggedrec.distributed import train_pipeline
    from jaggedrec.distributed.train_pipeline import train_pipelines

    for name in ("TrainPipeline", "TrainPipelineBase", "TrainPipelineSparseDist", "TrainPipelineSemiSync"):
        assert getattr(jd, name) is getattr(train_pipeline, name) is getattr(train_pipelines, name)
    torchrec_pipelines = pytest.importorskip("torchrec.distributed.train_pipeline.train_pipelines")
    for name in ("TrainPipeline", "TrainPipelineBase", "TrainPipelineSparseDist", "TrainPipelineSemiSync"):
        assert hasattr(torchrec_pipelines, name)


@pytest.mark.parametrize("cls_name", ["TrainPipelineBase", "TrainPipelineSparseDist", "TrainPipelineSemiSync"])
def test_one_process_steps_equal_the_plain_loop_and_stop(cls_name):
    """No sharded module: every pipeline is the plain loop; StopIteration after the last
    batch (and again after); a failing step raises and the next steps go on."""
    import jaggedrec.distributed as jd

    batches = [_Pair(b) for b in _tiny_batches(6)]
    ref = _Tiny(raise_on=3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    expected = []
    for b in batches:
        ref_opt.zero_grad()
        try:
            loss, out = ref(b)
        except RuntimeError:
            expected.append("failed")
            continue
        loss.backward()
        ref_opt.step()
        expected.append(out)
    model = _Tiny(raise_on=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"start_batch": 0} if cls_name == "TrainPipelineSemiSync" else {}
    pipe = getattr(jd, cls_name)(model, opt, torch.device("cpu"), **kwargs)
    it, got = iter(batches), []
    while True:
        try:
            got.append(pipe.progress(it))
        except StopIteration:
            break
        except RuntimeError:
            got.append("failed")
    with pytest.raises(StopIteration):
        pipe.progress(it)
    assert len(got) == len(expected) == 6 and got[2] == "failed"
    assert all(torch.equal(g, e) for g, e in zip(got, expected) if not isinstance(e, str))
    assert torch.equal(model.lin.weight, ref.lin.weight)
    model.eval()  # eval: the forward only
    before = model.lin.weight.detach().clone()
    pipe.reset()
    assert len([pipe.progress(iter(batches[:2])) for _ in range(2)]) == 2
    assert torch.equal(model.lin.weight, before)
    pipe.close()


def test_refused_options_and_batches():
    import jaggedrec.distributed as jd

    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    for cls, kwargs in ((jd.TrainPipelineSparseDist, {"apply_jit": True}),
                        (jd.TrainPipelineSparseDist, {"clear_data_dist_inputs": True}),
                        (jd.TrainPipelineBase, {"enable_inplace_copy_batch": True}),
                        (jd.TrainPipelineSemiSync, {"stash_gradients": True})):
        with pytest.raises(NotImplementedError, match=next(iter(kwargs))):
            cls(model, opt, cpu, **kwargs)
    with pytest.raises(TypeError, match=r"\.to\(device"):
        jd.TrainPipelineBase(model, opt, cpu).progress(iter([object()]))
