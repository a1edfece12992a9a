"""The benchmark CLI (``jaggedrec-bench``): end to end on CPU on tiny shapes, the GB/s formula,
and that a provider with a wrong answer is reported as wrong and never timed."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.presets import PRESETS, preset_workloads
from jaggedrec.benchmarks.providers import EmbeddingBagLoop, Provider, all_providers
from jaggedrec.benchmarks.timing import plan_samples, quantiles, rounds_schedule
from jaggedrec.benchmarks.workload import Workload, bytes_per_step, make_batches

# 3 tables of dims 4, 8, 4: small enough that a whole run takes about a second
TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8", "--batch-size", "8",
        "--pooling-factor", "2", "--bag-size", "random", "--repeats", "3", "--batches", "2", "--no-progress"]


def test_end_to_end_json_has_every_provider(tmp_path, capsys):
    out, table = tmp_path / "run.json", tmp_path / "run.csv"
    assert cli.main(TINY + ["--output", str(out), "--csv", str(table)]) == 0
    doc = json.loads(out.read_text())
    for key in ("platform", "cpu", "cores", "python", "torch", "triton", "numpy", "gpu", "date"):
        assert key in doc["machine"]
    assert doc["copy_bandwidth_gbps"] > 0
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
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == list(providers)
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


def test_no_matplotlib_means_no_plot_and_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    plot = tmp_path / "none.png"
    assert cli.main(TINY + ["--providers", "eb_loop", "--plot", str(plot)]) == 0
    assert not plot.exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_module_help_runs():
    done = subprocess.run([sys.executable, "-m", "jaggedrec.benchmarks", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--pooling-factor" in done.stdout and "--preset" in done.stdout


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
    schedule = rounds_schedule([10, 4], rounds=3)
    assert [sum(t for p, t in chunk if p == 0) for chunk in schedule] == [4, 3, 3]
    assert sum(t for chunk in schedule for p, t in chunk if p == 1) == 4
    assert [p for p, _ in schedule[1]] == [1, 0]  # odd rounds run in reverse order
    assert plan_samples(5000.0, repeats=10) == 3  # 5 s steps: as many as fit in 10 s, at least 3
    assert plan_samples(50.0, repeats=10) == 10
    assert plan_samples(0.01, repeats=10) == 100  # cheap steps: more samples, at most 10x


def test_cpu_floor_runs_on_a_tiny_shape(capsys):
    from jaggedrec.benchmarks import cpu_floor
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


def test_module_ec_runs_every_provider_in_each_mode(tmp_path, capsys):
    """``--module ec``: the EmbeddingCollection against the nn.Embedding loop (and TorchRec's EC
    and FBGEMM's TBE where they import), outputs checked before timing; mixed dims skip the
    providers that need one dim, saying why."""
    out = tmp_path / "ec.json"
    assert cli.main(["--module", "ec", "--preset", "sequence", "mixed-dims", "--mode", "forward", "backward",
                     "train", "--tables", "3", "--rows", "50", "--batch", "4", "--ids-per-bag", "2",
                     "--repeats", "2", "--batches", "2", "--output", str(out)]) == 0
    runs = json.load(open(out))["runs"]
    assert [(r["preset"], r["mode"]) for r in runs] == [(p, m) for p in ("sequence", "mixed-dims")
                                                        for m in ("forward", "backward", "train")]
    for run in runs:
        results = run["results"]
        for name in ("embedding_loop", "jaggedrec"):
            assert results[name]["status"] == "ok" and results[name]["median_ms"] > 0, (run["mode"], name)
        assert results["embedding_loop"]["vs_loop"] == 1.0
        if run["preset"] == "mixed-dims":  # (or not importable, where TorchRec is not installed)
            assert any(why in results["torchrec_ec"]["reason"] for why in ("one dim", "not importable"))
        assert not any(r["status"] == "skipped" and r["reason"].startswith("wrong") for r in results.values())
    assert "vs loop" in capsys.readouterr().out
    assert cli.main(["--module", "nope"]) == 2


def test_quant_speed_checks_and_times_every_provider():
    from jaggedrec.benchmarks import quant_speed
    w = preset_workloads("pooling", "cpu")[0].replace(num_embeddings=300, batch_size=8, tables=3)
    results = quant_speed.run(w, repeats=2, batches=2)
    for name in ("jaggedrec fp32", "jaggedrec int8", "jaggedrec int4", "torch ops loop int8", "torch ops loop int4"):
        assert results[name]["status"] == "ok" and results[name]["median_ms"] > 0, (name, results[name])
    assert results["jaggedrec int4"]["bytes"] < results["jaggedrec int8"]["bytes"] < results["jaggedrec fp32"]["bytes"]
