"""The pipeline benchmark (``jaggedrec-bench --world-size N --pipeline ...``): one tiny run on 2
gloo ranks through the CLI entry point (JSON and CSV fields, the delay paid by both libraries'
collectives, TorchRec's provider skipped cleanly without TorchRec), its refused flags, and,
without processes (a one-rank gloo group in this process), the collective delay itself."""

import csv
import json
import sys
import time

import pytest
import torch
import torch.distributed as dist

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.comm_delay import DelayedCollectives, DelayedWork
from jaggedrec.benchmarks.pipeline_ranks import _hidden
from jaggedrec.testing import free_port

TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8", "--batch-size", "8",
        "--pooling-factor", "2", "--bag-size", "random", "--repeats", "2", "--steps", "2", "--batches", "2",
        "--threads", "1", "--no-progress", "--timeout", "120"]
DELAY_MS = 30.0
# the unit tests' delay: long enough that a loaded machine's scheduling hiccups (a few ms) stay
# well inside the margins the assertions allow
UNIT_DELAY_MS = 100.0


def _torchrec_imports() -> bool:
    try:
        import torchrec.distributed  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo group of one rank in this process, for the delay's unit tests."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_synchronous_collective_pays_the_delay_and_is_counted(one_rank_group):
    x, out = torch.arange(4.0), torch.empty(4)
    original = dist.all_to_all_single
    with DelayedCollectives(UNIT_DELAY_MS) as comm:
        assert dist.all_to_all_single is not original  # replaced while installed
        begin = time.perf_counter()
        dist.all_to_all_single(out, x)  # not active yet: no delay, not counted
        assert time.perf_counter() - begin < UNIT_DELAY_MS / 1e3 and not comm.calls
        comm.active = True
        begin = time.perf_counter()
        dist.all_to_all_single(out, x)
        dist.all_reduce(x)
        elapsed = time.perf_counter() - begin
    assert torch.equal(out, torch.arange(4.0))
    assert elapsed >= 2 * UNIT_DELAY_MS / 1e3  # one after the other: each pays all of it
    assert comm.calls == {"all_to_all_single": 1, "all_reduce": 1}
    assert comm.blocked_s == pytest.approx(elapsed, rel=0.05)
    assert dist.all_to_all_single is original  # restored on exit


def test_asynchronous_collective_hides_the_delay_behind_work(one_rank_group):
    x, out = torch.arange(6.0), torch.empty(6)
    with DelayedCollectives(UNIT_DELAY_MS) as comm:
        comm.active = True
        begin = time.perf_counter()
        work = dist.all_to_all_single(out, x, async_op=True)
        assert isinstance(work, dist.Work) and isinstance(work, DelayedWork)  # TorchRec checks dist.Work
        assert not work.is_completed()  # the delay has not passed yet
        time.sleep(2 * UNIT_DELAY_MS / 3e3)  # compute while the collective is in flight
        waited_from = time.perf_counter()
        work.wait()
        done = time.perf_counter()
        # a second one issued now and waited at once pays the whole delay: its deadline counts
        # from the issue, so the clock starts before the call (time spent issuing is part of it)
        second_from = time.perf_counter()
        second = dist.all_reduce(x, async_op=True)
        second.wait()
        second_wait = time.perf_counter() - second_from
        # and a future taken from the work completes no earlier than the delay either
        fut_from = time.perf_counter()
        dist.all_reduce(x, async_op=True).get_future().wait()
        fut_elapsed = time.perf_counter() - fut_from
    assert done - begin >= UNIT_DELAY_MS / 1e3
    assert done - waited_from < 0.75 * UNIT_DELAY_MS / 1e3  # only what the sleep did not cover
    assert second_wait >= UNIT_DELAY_MS / 1e3
    assert fut_elapsed >= UNIT_DELAY_MS / 1e3
    assert comm.calls == {"all_to_all_single": 1, "all_reduce": 2}


def test_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay must be >= 0"):
        DelayedCollectives(-1.0)
    with pytest.raises(ValueError, match="not a wrapped collective: barrier"):
        DelayedCollectives(1.0, undelayed=["barrier"])


def test_an_undelayed_collective_is_counted_but_not_delayed(one_rank_group):
    x = torch.ones(3)
    with DelayedCollectives(UNIT_DELAY_MS, undelayed=["all_reduce"]) as comm:
        comm.active = True
        begin = time.perf_counter()
        dist.all_reduce(x)
        dist.all_reduce(x, async_op=True).wait()
        elapsed = time.perf_counter() - begin
        dist.broadcast(x, 0)  # still delayed
        total = time.perf_counter() - begin
    assert elapsed < UNIT_DELAY_MS / 1e3 <= total
    assert comm.calls == {"all_reduce": 2, "broadcast": 1}


def test_hidden_is_the_share_of_the_plain_loops_added_time():
    rows = [{"provider": f"jaggedrec_{p}", "library": "jaggedrec", "pipeline": p, "delay_ms": d, "median_ms": ms,
             "p20_ms": ms / 2} for p, d, ms in [("none", 0.0, 10.0), ("none", 20.0, 90.0), ("sparse_dist", 0.0, 11.0),
                             ("sparse_dist", 20.0, 31.0)]]
    _hidden(rows)
    by = {(r["pipeline"], r["delay_ms"]): r for r in rows}
    assert by[("none", 20.0)]["delay_cost_ms"] == 80.0 and by[("none", 20.0)]["hidden"] == 0.0
    assert by[("sparse_dist", 20.0)]["delay_cost_ms"] == 20.0
    assert by[("sparse_dist", 20.0)]["hidden"] == pytest.approx(0.75)
    assert by[("sparse_dist", 20.0)]["hidden_p20"] == pytest.approx(0.75)  # the same, from the p20s
    assert by[("sparse_dist", 0.0)]["hidden"] is None


def test_two_ranks_report_each_pipeline_with_the_delay_paid(tmp_path, capsys):
    out, table = tmp_path / "pipeline.json", tmp_path / "pipeline.csv"
    argv = ["--world-size", "2", "--pipeline", "sparse_dist", "--comm-delay-ms", f"0,{DELAY_MS:g}",
            "--output", str(out), "--csv", str(table)] + TINY
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["module"] == "pipeline" and doc["config"]["world_size"] == 2
    assert doc["machine"]["torch_threads"] == 1 and doc["config"]["pipelines"] == ["none", "sparse_dist"]
    rows = {(r["provider"], r["delay_ms"]): r for r in doc["rows"]}
    libraries = ["jaggedrec", "torchrec"] if _torchrec_imports() else ["jaggedrec"]
    if not _torchrec_imports():
        assert "torchrec_none" in doc["skipped"] and "torchrec" in doc["skipped"]["torchrec_none"].lower()
    for lib in libraries:
        plain0, plain = rows[(f"{lib}_none", 0.0)], rows[(f"{lib}_none", DELAY_MS)]
        # the delay reached this library's own collectives (not only DDP's all-reduce): counted, and every
        # plain step pays at least two delays, the input distribution's and then the output's
        assert plain["collectives_by_name"].get("all_to_all_single", 0) >= 2
        assert plain0["collectives_per_step"] == plain["collectives_per_step"] >= 3
        assert min(plain["samples_ms"]) >= 2 * DELAY_MS
        assert plain["delay_cost_ms"] == pytest.approx(plain["median_ms"] - plain0["median_ms"])
        assert plain["hidden"] == 0.0 and 0 < plain["wait_share"] < 1
        assert plain0["batches_held"] == 0 and plain0["first_output_err"] == pytest.approx(0.0, abs=1e-5)
        piped = rows.get((f"{lib}_sparse_dist", DELAY_MS))
        if piped is None:  # the library has no such pipeline here: said why
            assert f"{lib}_sparse_dist" in doc["skipped"]
            continue
        assert min(piped["samples_ms"]) >= DELAY_MS and piped["hidden"] is not None
        assert piped["batches_held"] >= 1 and piped["first_output_err"] == pytest.approx(0.0, abs=1e-5)
    with open(table) as f:
        records = list(csv.DictReader(f))
    assert {"provider", "delay_ms", "median_ms", "wait_share", "hidden", "peak_mb", "held_mb",
            "torch_threads"} <= set(records[0])
    assert len(records) == len(doc["rows"]) + len(doc["skipped"])
    printed = capsys.readouterr().out
    assert "hidden" in printed and "jaggedrec_none" in printed and "1 torch thread per rank" in printed


def test_torchrec_missing_is_a_skip_with_the_reason(tmp_path, monkeypatch):
    from jaggedrec.benchmarks.providers.pipeline import PipelineProvider
    from jaggedrec.benchmarks.workload import Workload

    monkeypatch.setitem(sys.modules, "torchrec", None)  # `import torchrec...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchrec.modules.embedding_modules", None)
    reason = PipelineProvider("torchrec", "sparse_dist", env=None).skip_reason(Workload())
    assert reason and "not importable" in reason and "torchrec" in reason.lower()
    assert PipelineProvider("jaggedrec", "none", env=None).skip_reason(Workload()) is None


@pytest.mark.parametrize("flags,message", [
    (["--pipeline", "none"], "needs --world-size"),
    (["--world-size", "2", "--pipeline", "fast"], "choose from none, base, sparse_dist, semi_sync"),
    (["--world-size", "2", "--pipeline", "none", "--comm-delay-ms", "-5"], "delays are >= 0 ms"),
    (["--world-size", "2", "--pipeline", "none", "--mode", "forward"], "trains"),
    (["--world-size", "2", "--pipeline", "none", "--batch-size", "8,16"], "not a sweep"),
])
def test_bad_flags_exit_2_with_a_message(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_pipeline_flags(capsys):
    import re

    from jaggedrec.benchmarks.pipeline import build_pipeline_parser

    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])  # the first help a newcomer reads
    assert e.value.code == 0
    listed = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    assert {"--pipeline", "--comm-delay-ms", "--steps", "--dense-features"} <= listed
    assert set(re.findall(r"--[a-z][a-z-]*", build_pipeline_parser().format_help())) <= listed
