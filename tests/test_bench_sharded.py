"""The sharded benchmark (``jaggedrec-bench --world-size N --sharding ...``): a tiny workload on
2 gloo ranks for each sharding type through the CLI entry point, the flag combinations it
refuses, and, without processes, the byte counts of the collective counter and the local
slice of a global batch."""

import json

import pytest
import torch

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.sharded_comm import _SENT
from jaggedrec.benchmarks.providers.sharded import local_batch
from jaggedrec.benchmarks.workload import Workload, make_batches

# 3 tables of dims 4, 8, 4 and 8 bags per rank: a run is dominated by starting the two ranks
TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8", "--batch-size", "8",
        "--pooling-factor", "2", "--bag-size", "random", "--repeats", "2", "--batches", "2", "--threads", "1",
        "--no-progress"]


def _torchrec_imports() -> bool:
    try:
        import torchrec.distributed  # noqa: F401
    except Exception:
        return False
    return True


# both modes are covered, one per sharding type, so that each test stays near 25 s on two cores
@pytest.mark.parametrize("sharding,mode", [("table_wise", "forward"), ("row_wise", "train"),
                                           ("column_wise", "forward"), ("data_parallel", "train"),
                                           ("auto", "train")])
def test_two_ranks_report_every_provider(tmp_path, capsys, sharding, mode):
    out = tmp_path / "sharded.json"
    argv = ["--world-size", "2", "--sharding", sharding, "--mode", mode, "--output", str(out)] + TINY
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["module"] == "sharded" and doc["sharding"]["world_size"] == 2
    (run,) = doc["runs"]
    assert run["config"]["batch_size"] == 8 and run["config"]["mode"] == mode
    providers = run["providers"]
    assert list(providers) == ["jaggedrec_1proc", "jaggedrec_sharded", "torchrec_dmp"]
    base, ours, theirs = providers.values()
    assert base["status"] == ours["status"] == "ok", (base["reason"], ours["reason"])
    assert base["vs_1proc"] == pytest.approx(1.0)
    assert ours["plan"] and 0 < ours["p20_ms"] <= ours["median_ms"] <= ours["p80_ms"]
    assert ours["vs_1proc"] == pytest.approx(base["median_ms"] / ours["median_ms"])
    # every jaggedrec step agrees on the batch with an all-to-all, so every rank sends something
    assert len(ours["bytes_sent_by_rank"]) == 2 and min(ours["bytes_sent_by_rank"]) > 0
    assert 0 < ours["wait_share"] < 1 and len(ours["wait_share_by_rank"]) == 2
    if _torchrec_imports():
        assert theirs["status"] == "ok", theirs["reason"]
        assert theirs["median_ms"] > 0 and theirs["bytes_sent_per_rank"] >= 0 and theirs["plan"]
    else:
        assert theirs["status"] == "skipped" and "torchrec" in theirs["reason"].lower()
    printed = capsys.readouterr().out
    assert "MB sent/rank" in printed and "jaggedrec_sharded" in printed and f"--sharding {sharding}" in printed


@pytest.mark.parametrize("flags,message", [
    (["--world-size", "0", "--sharding", "auto"], "--world-size must be at least 1"),
    (["--world-size", "2", "--sharding", "diagonal"], "invalid choice: 'diagonal'"),
    (["--world-size", "2"], "required: --sharding"),
    (["--sharding", "row_wise"], "required: --world-size"),
    (["--world-size", "2", "--sharding", "auto", "--mode", "backward"], "forward or train"),
    (["--world-size", "2", "--sharding", "auto", "--vbe-users", "4"], "no VBE"),
    (["--module", "ec", "--world-size", "2", "--sharding", "auto"], "the bag collection (ebc) only"),
])
def test_bad_flags_exit_2_with_a_message(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(flags + TINY)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bytes_sent_count_only_what_leaves_the_rank():
    x = torch.zeros(6, 4)  # 16 bytes a row
    a2a, _ = _SENT["all_to_all_single"]
    assert a2a(2, 0, (torch.empty(5, 4), x, [1, 4], [2, 4]), {}) == 4 * 16  # rank 0 keeps its 2 rows
    assert a2a(3, 1, (), {"output": x, "input": x}) == 96 * 2 // 3          # equal blocks, 2 of 3 leave
    gather, _ = _SENT["all_gather_into_tensor"]
    assert gather(4, 2, (torch.empty(24, 4), x), {}) == 96 * 3
    scatter, _ = _SENT["reduce_scatter_tensor"]
    assert scatter(2, 1, (torch.empty(3, 4), x), {}) == 48
    reduce, _ = _SENT["all_reduce"]
    assert reduce(4, 0, (x,), {}) == 2 * 96 * 3 // 4
    broadcast, _ = _SENT["broadcast"]
    assert broadcast(3, 0, (x, 0), {}) == 192 and broadcast(3, 1, (x, 0), {}) == 0


def test_local_batch_is_the_ranks_slice_of_every_feature():
    w = Workload(tables=3, num_embeddings=20, batch_size=4, pooling_factor=2, bag_size="random", weighted=True,
                 mode="train")
    (full,) = make_batches(w.replace(batch_size=8), 1, seed=3)
    for rank in (0, 1):
        part = local_batch(full, w, rank)
        assert part.lengths.numel() == 12 and part.grad_out.shape == (4, w.total_dim)
        assert torch.equal(part.grad_out, full.grad_out[4 * rank:4 * rank + 4])
        kjt, whole = part.jaggedrec_kjt(w.keys), full.jaggedrec_kjt(w.keys)
        for key in w.keys:
            mine, all_bags = kjt[key], whole[key]
            assert torch.equal(mine.lengths(), all_bags.lengths()[4 * rank:4 * rank + 4])
            lo, hi = int(all_bags.offsets()[4 * rank]), int(all_bags.offsets()[4 * rank + 4])
            assert torch.equal(mine.values(), all_bags.values()[lo:hi])
            assert torch.equal(mine.weights(), all_bags.weights()[lo:hi])
