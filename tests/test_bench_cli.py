"""The benchmark CLI (``jaggedrec-bench``): end to end on CPU on tiny shapes, the GB/s formula,
and that a provider with a wrong answer is reported as wrong and never timed."""

import csv
import importlib
import json
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

from jaggedrec.benchmarks import cli, flags
from jaggedrec.benchmarks.presets import PRESETS, preset_workloads
from jaggedrec.benchmarks.report import spread_warnings
from jaggedrec.benchmarks.runner import ProviderResult, WorkloadResult
from jaggedrec.benchmarks.providers import EmbeddingBagLoop, EmbeddingLoop, Provider, all_providers, ec_providers
from jaggedrec.benchmarks.timing import interleaved_order, plan_samples, quantiles
from jaggedrec.benchmarks.workload import Workload, bytes_per_step, ec_bytes_per_step, make_batches, make_ec_batches

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "tools"
# 3 tables of dims 4, 8, 4: small enough that a whole run takes about a second
TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8", "--batch-size", "8",
        "--pooling-factor", "2", "--bag-size", "random", "--repeats", "3", "--batches", "2", "--no-progress"]


def test_end_to_end_json_has_every_provider(tmp_path, capsys):
    out, table = tmp_path / "run.json", tmp_path / "run.csv"
    threads = torch.get_num_threads()
    assert cli.main(TINY + ["--output", str(out), "--csv", str(table)]) == 0
    assert torch.get_num_threads() == threads  # the caller's threads are put back
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch_threads"] == 1  # one thread on CPU unless --threads says otherwise
    for key in ("platform", "cpu", "cores", "python", "torch", "triton", "numpy", "gpu", "date"):
        assert key in doc["machine"]
    assert doc["copy_bandwidth_gbps"] > 0
    assert list(doc) == ["machine", "copy_bandwidth_gbps", "preset", "command", "runs"]  # no "module" key
    (run,) = doc["runs"]
    assert run["config"]["dims"] == [4, 8] and run["config"]["tables"] == 3
    providers = run["providers"]
    assert list(providers) == [p.name for p in all_providers()]
    for name, r in providers.items():
        assert r["status"] in ("ok", "skipped"), (name, r)
        if r["status"] == "skipped":
            assert r["reason"], name
            assert r["median_ms"] is None
        else:
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], name
            assert r["gbps"] == pytest.approx(run["bytes_per_step"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["peak_mem_mb"] is not None and r["state_mb"] > 0
    assert providers["eb_loop"]["speedup_vs_loop"] == pytest.approx(1.0)
    assert providers["jaggedrec[torch]"]["status"] == "ok"
    assert providers["jaggedrec_compiled"]["status"] == "ok"  # verified against the loop, then timed
    assert "CUDA" in providers["jaggedrec[triton]"]["reason"]
    assert "dim" in providers["eb_concat"]["reason"]  # dims 4 and 8: no single concatenated weight
    with open(table, newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert len(header) == len(set(header)), header  # each column once: DictReader would drop one
    assert [r["provider"] for r in rows] == list(providers)
    assert {r["device"] for r in rows} == {"cpu"} and {r["torch_threads"] for r in rows} == {"1"}
    printed = capsys.readouterr().out
    assert "median ms" in printed and "skipped:" in printed and "jaggedrec[torch]" in printed


def test_sweep_with_provider_subset_and_plot(tmp_path):
    plot = tmp_path / "sweep.png"
    args = TINY + ["--tables", "1,2", "--mode", "train", "--providers", "jaggedrec-torch", "--plot", str(plot),
                   "--output", str(tmp_path / "sweep.json")]
    assert cli.main(args) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"]["tables"] for r in doc["runs"]] == [1, 2]
    for run in doc["runs"]:  # the loop baseline is always there, as the reference
        assert list(run["providers"]) == ["eb_loop", "jaggedrec[torch]"]
        assert run["providers"]["jaggedrec[torch]"]["status"] == "ok"
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_provider_selection_by_name_or_prefix():
    names = [p.name for p in all_providers()]

    def error(message):
        raise ValueError(message)

    assert cli.select_providers("jaggedrec,fbgemm", names, error) == [
        "eb_loop", "jaggedrec[torch]", "jaggedrec[triton]", "jaggedrec_compiled", "jaggedrec_vbe", "fbgemm_tbe"]
    assert cli.select_providers("JaggedRec-Torch", names, error) == ["eb_loop", "jaggedrec[torch]"]
    assert cli.select_providers(None, names, error) == names
    with pytest.raises(ValueError, match="unknown provider"):
        cli.select_providers("tensorflow", names, error)


def test_bytes_per_step_hand_worked():
    w = Workload(tables=2, dims=(4, 8), batch_size=3, dtype="fp32")
    # rows gathered: 10 ids of dim 4 and 6 ids of dim 8, 4 bytes each; output: 3 x (4+8) fp32
    assert bytes_per_step(w, [10, 6]) == 10 * 4 * 4 + 6 * 8 * 4 + 3 * 12 * 4 == 496
    assert bytes_per_step(w.replace(dtype="fp16"), [10, 6]) == 10 * 4 * 2 + 6 * 8 * 2 + 3 * 12 * 4
    assert bytes_per_step(w.replace(mode="backward"), [10, 6]) == 2 * (352 + 144)
    assert bytes_per_step(w.replace(mode="train"), [10, 6]) == 3 * 352 + 2 * 144


class _OffByAHundredth(EmbeddingBagLoop):
    name = "off_by_a_hundredth"

    def forward(self, batch):
        return super().forward(batch) + 1e-2


class _DoubleGradient(EmbeddingBagLoop):
    """Right forward values, twice the right gradient."""

    name = "double_gradient"

    def forward(self, batch):
        out = super().forward(batch)
        return out + (out - out.detach())


class _Unbuilt(Provider):
    name = "not_built_yet"

    def build(self, tables, w):
        raise NotImplementedError("the Triton backend is not built yet")


def _broken_providers():
    return [EmbeddingBagLoop(), _OffByAHundredth(), _DoubleGradient(), _Unbuilt()]


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_wrong_provider_is_reported_not_timed(tmp_path, capsys, mode):
    out = tmp_path / "wrong.json"
    rc = cli.main(TINY + ["--mode", mode, "--output", str(out)], provider_factory=_broken_providers)
    assert rc == 1
    providers = json.loads(out.read_text())["runs"][0]["providers"]
    wrong = providers["off_by_a_hundredth"]
    assert wrong["status"] == "wrong" and "max abs err" in wrong["reason"]
    assert wrong["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)
    assert wrong["median_ms"] is None and wrong["samples_ms"] == [] and wrong["gbps"] is None
    if mode == "backward":  # the forward matches; only the gradient check catches it
        assert providers["double_gradient"]["status"] == "wrong"
        assert "gradient" in providers["double_gradient"]["reason"]
    else:
        assert providers["double_gradient"]["status"] == "ok"
    assert providers["not_built_yet"]["status"] == "skipped"
    assert "NotImplementedError" in providers["not_built_yet"]["reason"]
    assert providers["eb_loop"]["status"] == "ok"
    assert "WRONG" in capsys.readouterr().out


class _Erratic(EmbeddingBagLoop):
    """Right answers, and every other step 20 ms late, as when another process takes the core."""

    name = "erratic"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def step(self, batch):
        self.calls += 1
        if self.calls % 2:
            time.sleep(0.02)
        super().step(batch)


def test_a_wide_spread_is_warned_about(capsys):
    assert cli.main(TINY, provider_factory=lambda: [EmbeddingBagLoop(), _Erratic()]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("warning")]
    assert any(line.startswith("  warning erratic: p20-p80") for line in warned), warned
    # the rule itself: a spread past half the median is flagged, a tight one is not
    w = Workload()
    run = WorkloadResult(w, {"steady": ProviderResult("ok", median_ms=10.0, p20_ms=9.0, p80_ms=11.0),
                             "wide": ProviderResult("ok", median_ms=10.0, p20_ms=4.0, p80_ms=9.5 + 0.6),
                             "skipped": ProviderResult("skipped", "why")}, 1.0)
    assert [line.split(":")[0] for line in spread_warnings(run)] == ["  warning wide"]


def test_no_matplotlib_means_no_plot_and_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    plot = tmp_path / "none.png"
    assert cli.main(TINY + ["--providers", "eb_loop", "--plot", str(plot)]) == 0
    assert not plot.exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_module_help_runs_and_lists_every_flag():
    done = subprocess.run([sys.executable, "-m", "jaggedrec.benchmarks", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"--[a-z][a-z-]*", done.stdout))
    assert {"--pooling-factor", "--preset", "--module", "--world-size", "--sharding", "--timeout"} <= listed
    # whatever the module or the sharded benchmark accepts, the first help a newcomer reads names it
    for parser in (flags.build_parser("ec"), flags.build_parser("ebc", sharded=True)):
        assert set(re.findall(r"--[a-z][a-z-]*", parser.format_help())) <= listed


def test_bad_provider_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + ["--providers", "nope"])
    assert e.value.code == 2
    assert "unknown provider" in capsys.readouterr().err


def test_batches_mean_pooling_factor_with_empty_bags():
    w = Workload(tables=2, num_embeddings=1000, batch_size=4000, pooling_factor=20, bag_size="random",
                 distribution="zipf")
    (b,) = make_batches(w, 1, seed=3)
    lengths = b.lengths.view(2, -1).float()
    assert lengths.mean().item() == pytest.approx(20, rel=0.05)
    assert (lengths == 0).any()
    assert b.offsets[-1].item() == b.values.numel() == sum(b.ids_per_feature)
    assert 0 <= b.values.min().item() and b.values.max().item() < 1000
    counts = torch.bincount(b.values, minlength=1000)
    assert counts.max().item() > 20 * counts.float().median().item()  # zipf: a few rows are hot
    fixed = make_batches(w.replace(bag_size="fixed", pooling_factor=1), 2, seed=3)
    assert all(bool((x.lengths == 1).all()) for x in fixed)
    assert not torch.equal(fixed[0].values, fixed[1].values)  # distinct batches to rotate over


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_fit_their_device(name):
    for device, limit_gb in (("cpu", 1.5), ("cuda", 8.0)):
        for w in preset_workloads(name, device):
            table_bytes = w.num_embeddings * w.total_dim * torch.empty(0, dtype=w.torch_dtype).element_size()
            assert table_bytes <= limit_gb * 1e9, (device, w)  # one copy per provider must fit


def test_timing_helpers():
    assert quantiles([5, 1, 3, 2, 4]) == (3, pytest.approx(1.8), pytest.approx(4.2))
    # one sample at a time, every provider once a turn, odd turns backward from the one before last
    assert interleaved_order(3, 3) == [0, 1, 2, 1, 0, 2, 0, 1, 2]
    assert interleaved_order(2, 0) == []
    for providers in range(1, 6):
        order = interleaved_order(providers, 7)
        assert all(order.count(p) == 7 for p in range(providers))
        # no sample right after the same provider's (it would find its own tables warm)
        assert providers == 1 or all(a != b for a, b in zip(order, order[1:])), order
        # each provider follows more than one other provider, where there are others
        assert providers < 3 or all(len({a for a, b in zip(order, order[1:]) if b == p}) > 1
                                    for p in range(providers))
    assert plan_samples(5000.0, repeats=10) == 3  # 5 s steps: as many as fit in 10 s, at least 3
    assert plan_samples(50.0, repeats=10) == 10
    assert plan_samples(0.01, repeats=10) == 100  # cheap steps: more samples, at most 10x


def test_cpu_floor_runs_on_a_tiny_shape(capsys, monkeypatch):
    # a development tool beside the package (benchmarks/tools/, not installed), run as a script
    monkeypatch.syspath_prepend(str(TOOLS))
    cpu_floor = importlib.import_module("cpu_floor")
    cpu_floor.main(["--tables", "2", "--rows", "50", "--dim", "8", "--batch-size", "16", "--pooling-factor", "3",
                    "--repeats", "1"])
    out = capsys.readouterr().out
    assert "write back: index_copy_" in out and "streamed:" in out
    assert "floor, touched rows scattered" in out and "floor, every row streamed" in out


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_vbe_batches_expand_to_the_same_batch_and_the_vbe_provider_is_checked(tmp_path, mode):
    """The deduplicated f0 (VBE) expands to exactly the batch the other providers see, and
    jaggedrec_vbe's output is checked against the loop before it is timed."""
    w = Workload(tables=2, num_embeddings=40, dims=(4,), batch_size=12, pooling_factor=2, bag_size="random",
                 vbe_users=3, weighted=True)
    for b in make_batches(w, 2, seed=1):
        kjt = b.vbe.jaggedrec_kjt(w.keys)
        assert kjt.stride_per_key() == [3, 12] and kjt.stride() == 12
        users = b.vbe.inverse_indices[0]
        assert sorted(set(users.tolist())) == [0, 1, 2]
        f0 = kjt["f0"]
        expanded = b.lengths[:12]
        assert expanded.tolist() == f0.lengths()[users].tolist()
        per_user = f0.to_dense()
        assert b.values[:b.key_offsets[1]].tolist() == [i for u in users.tolist() for i in per_user[u].tolist()]
        assert torch.equal(b.values[b.key_offsets[1]:], kjt["f1"].values())
    out = tmp_path / "vbe.json"
    args = TINY + ["--vbe-users", "3", "--weighted", "--mode", mode, "--providers", "jaggedrec", "--output", str(out)]
    assert cli.main(args) == 0
    providers = json.loads(out.read_text())["runs"][0]["providers"]
    assert providers["jaggedrec_vbe"]["status"] == "ok"
    assert cli.main(TINY + ["--providers", "jaggedrec_vbe", "--output", str(out)]) == 0
    assert "vbe-users" in json.loads(out.read_text())["runs"][0]["providers"]["jaggedrec_vbe"]["reason"]


# --module ec: the same tiny shape, one dim (so TorchRec's EC and FBGEMM's PoolingMode.NONE can run)
TINY_EC = ["--module", "ec"] + [a if a != "4,8" else "8" for a in TINY]


def test_module_ec_end_to_end_every_mode(tmp_path, capsys):
    """``--module ec``: every provider in every mode (forward, backward, train by default), each
    output checked against the nn.Embedding loop before it is timed, ratios to that loop."""
    out, table = tmp_path / "ec.json", tmp_path / "ec.csv"
    assert cli.main(TINY_EC + ["--output", str(out), "--csv", str(table)]) == 0
    doc = json.loads(out.read_text())
    assert doc["module"] == "ec" and doc["preset"] == "pooling"
    assert doc["command"][:3] == ["jaggedrec-bench", "--module", "ec"]
    assert [r["config"]["mode"] for r in doc["runs"]] == ["forward", "backward", "train"]
    names = [p.name for p in ec_providers()]
    for run in doc["runs"]:
        mode, providers = run["config"]["mode"], run["providers"]
        assert run["config"]["dims"] == [8] and run["label"].startswith("3 tables")
        assert list(providers) == names
        for name, r in providers.items():
            assert r["status"] in ("ok", "skipped"), (mode, name, r)
            if r["status"] == "skipped":
                assert r["reason"] and r["median_ms"] is None, (mode, name)
            else:
                assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], (mode, name)
                assert r["gbps"] == pytest.approx(run["bytes_per_step"] / (r["median_ms"] * 1e-3) / 1e9)
        assert providers["embedding_loop"]["speedup_vs_loop"] == pytest.approx(1.0)
        assert providers["jaggedrec[torch]"]["status"] == "ok", mode
        assert providers["jaggedrec[torch]"]["speedup_vs_loop"] > 0
        assert "CUDA" in providers["jaggedrec[triton]"]["reason"]
        for peer in ("torchrec_ec", "fbgemm_tbe_none", "fbgemm_inference_none"):
            r = providers[peer]  # runs where the library imports, else says so
            assert r["status"] == "ok" or "not importable" in r["reason"] or mode != "forward", (peer, r)
        if mode == "backward":
            why = providers["fbgemm_tbe_none"]["reason"] or ""
            assert "dense-gradient backward" in why or "not importable" in why, why
        if mode != "forward":
            assert "no backward" in providers["fbgemm_inference_none"]["reason"] or \
                "not importable" in providers["fbgemm_inference_none"]["reason"]
    by_mode = {r["config"]["mode"]: r for r in doc["runs"]}
    # same ids in every mode; the byte count is 2, 4 and 5 times the rows' bytes
    rows = by_mode["forward"]["bytes_per_step"] / 2
    assert by_mode["backward"]["bytes_per_step"] == pytest.approx(4 * rows)
    assert by_mode["train"]["bytes_per_step"] == pytest.approx(5 * rows)
    with open(table, newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        csv_rows = list(csv.DictReader(f))
    assert len(header) == len(set(header)), header
    assert {r["module"] for r in csv_rows} == {"ec"} and len(csv_rows) == 3 * len(names)
    printed = capsys.readouterr().out
    assert "EmbeddingCollection: 3 tables" in printed and "vs loop" in printed
    assert "embedding_loop's median" in printed and "skipped:" in printed


def test_module_ec_mixed_dims_skip_the_one_dim_peers(tmp_path):
    out = tmp_path / "mixed.json"
    args = ["--module", "ec"] + TINY + ["--mode", "forward,train", "--providers", "jaggedrec-torch,torchrec,fbgemm",
                                        "--output", str(out)]
    assert cli.main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"]["mode"] for r in runs] == ["forward", "train"]
    for run in runs:
        providers = run["providers"]
        assert list(providers) == ["embedding_loop", "jaggedrec[torch]", "torchrec_ec", "fbgemm_tbe_none",
                                   "fbgemm_inference_none"]
        assert providers["jaggedrec[torch]"]["status"] == "ok"  # mixed dims are fine for jaggedrec
        for peer in ("torchrec_ec", "fbgemm_tbe_none"):
            reason = providers[peer]["reason"]
            assert "one embedding dim" in reason or "not importable" in reason, (peer, reason)


def test_ec_bytes_per_step_hand_worked():
    w = Workload(tables=2, dims=(4, 8), batch_size=3, dtype="fp32")
    # rows gathered: 10 ids of dim 4 and 6 ids of dim 8, 4 bytes each = 352; written out: 352 again
    assert ec_bytes_per_step(w, [10, 6]) == 2 * 352
    assert ec_bytes_per_step(w.replace(dtype="fp16"), [10, 6]) == 2 * 176
    assert ec_bytes_per_step(w.replace(mode="backward"), [10, 6]) == 4 * 352
    assert ec_bytes_per_step(w.replace(mode="train"), [10, 6]) == 5 * 352  # pooled's 3R + 2O with O = R
    with pytest.raises(ValueError, match="one id count per table"):
        ec_bytes_per_step(w, [10])


def test_ec_batches_have_a_gradient_row_per_id_and_the_same_ids_in_every_mode():
    w = Workload(tables=2, num_embeddings=30, dims=(4, 8), batch_size=5, pooling_factor=3, bag_size="random",
                 dtype="fp16")
    forward = make_ec_batches(w, 2, seed=4)
    train = make_ec_batches(w.replace(mode="train"), 2, seed=4)
    for f, t in zip(forward, train):
        assert torch.equal(f.values, t.values) and torch.equal(f.lengths, t.lengths)
        assert f.grad_out is None and f.grads is None
        assert [tuple(g.shape) for g in t.grads] == [(n, d) for n, d in zip(t.ids_per_feature, (4, 8))]
        assert t.grad_out.dtype == torch.float16 and t.grad_out.numel() == sum(g.numel() for g in t.grads)
        assert t.grads[1].data_ptr() == t.grad_out[t.grads[0].numel():].data_ptr()  # views of one buffer


class _EcOffByAHundredth(EmbeddingLoop):
    name = "ec_off_by_a_hundredth"

    def rows(self, batch):
        return [r + 1e-2 for r in super().rows(batch)]


class _EcDoubleGradient(EmbeddingLoop):
    """Right rows, twice the right gradient."""

    name = "ec_double_gradient"

    def rows(self, batch):
        return [r + (r - r.detach()) for r in super().rows(batch)]


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_module_ec_wrong_provider_is_reported_not_timed(tmp_path, capsys, mode):
    out = tmp_path / "wrong.json"
    rc = cli.main(TINY_EC + ["--mode", mode, "--output", str(out)],
                  provider_factory=lambda: [EmbeddingLoop(), _EcOffByAHundredth(), _EcDoubleGradient()])
    assert rc == 1
    providers = json.loads(out.read_text())["runs"][0]["providers"]
    wrong = providers["ec_off_by_a_hundredth"]
    assert wrong["status"] == "wrong" and "differs from embedding_loop" in wrong["reason"]
    assert wrong["median_ms"] is None and wrong["samples_ms"] == []
    assert providers["ec_double_gradient"]["status"] == ("wrong" if mode == "backward" else "ok")
    assert "WRONG" in capsys.readouterr().out


def test_module_flag_errors(capsys):
    assert cli.main(["--module", "nope"]) == 2
    assert "--module must be one of ebc, ec, fpebc" in capsys.readouterr().err
    for bad in (["--weighted"], ["--mode", "forward,sideways"], ["--vbe-users", "2"]):
        with pytest.raises(SystemExit) as e:
            cli.main(TINY_EC + bad)
        assert e.value.code == 2, bad
    assert cli.main(["--module", "ec", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "embedding_loop" in listing and "fbgemm_tbe_none" in listing and "eb_loop " not in listing


def test_busy_processes_run_beside_the_block_and_end_with_it():
    from jaggedrec.benchmarks.contention import busy_processes
    import time
    with busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        pids = [p.pid for p in procs]
        time.sleep(0.3)
        for pid in pids:  # each is running, not sleeping: it keeps a core busy
            with open(f"/proc/{pid}/stat") as f:
                user_ticks = int(f.read().rsplit(")", 1)[1].split()[11])
            assert user_ticks > 0, pid
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError), busy_processes(1) as procs:
        raise RuntimeError("the block failed")
    assert procs[0].poll() is not None  # killed however the block ends
    with busy_processes(0) as procs:
        assert procs == []


def test_busy_sweep_times_quiet_and_beside_a_busy_process(tmp_path, capsys):
    out = tmp_path / "busy.json"
    assert cli.main(TINY + ["--mode", "train", "--providers", "jaggedrec-torch", "--busy", "0,1",
                            "--output", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"]["busy"] for r in runs] == [0, 1]
    assert "busy" not in runs[0]["label"] and runs[1]["label"].endswith("beside 1 busy process")
    assert all(r["providers"]["jaggedrec[torch]"]["status"] == "ok" for r in runs)
    with pytest.raises(SystemExit):
        cli.main(TINY + ["--busy", "x"])
    assert "--busy" in capsys.readouterr().err


def test_the_installed_package_holds_the_cli_and_what_it_imports():
    """benchmarks/, installed as jaggedrec.benchmarks, holds the CLI and every module it reaches,
    nothing else; the development tools live in benchmarks/tools/, which is not a listed package."""
    import ast

    tomllib = pytest.importorskip("tomllib")
    root = TOOLS.parents[1]
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    sources = {}  # every module in the folder, listed or not
    for path in (root / "benchmarks").rglob("*.py"):
        parts = path.relative_to(root / "benchmarks").with_suffix("").parts
        sources[".".join(("jaggedrec", "benchmarks") + parts)] = path
    packaged = {m for m in sources if m.rsplit(".", 1)[0] in packages}
    assert "jaggedrec.benchmarks.cli" in packaged and not any(".tools" in m for m in packaged)
    reached, todo = set(), ["jaggedrec.benchmarks.__main__", "jaggedrec.benchmarks.__init__"]
    while todo:
        module = todo.pop()
        if module in reached or module not in sources:
            continue
        reached.add(module)
        here = module.rsplit(".", 1)[0]  # the module's package
        for node in ast.walk(ast.parse(sources[module].read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1] + ([base] if base else []))
                todo += [base, base + ".__init__"] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    assert sorted(reached - packaged) == []  # the CLI needs it: pyproject must list its package
    assert sorted(packaged - reached) == []  # shipped, but not the CLI's: a development tool
