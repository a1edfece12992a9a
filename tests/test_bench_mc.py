"""``jaggedrec-bench --module mc`` end to end on the tiny preset: every provider is timed,
TorchRec's MCH module beside ours when TorchRec is installed, and the train-step ratio of
hashed over static tables is reported."""

import importlib.util
import json

from jaggedrec.benchmarks import cli

TINY = ["--module", "mc", "--preset", "tiny", "--repeats", "2", "--batches", "2", "--no-progress"]


def test_mc_module_end_to_end(tmp_path):
    out = tmp_path / "run.json"
    assert cli.main(TINY + ["--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    results = doc["results"]
    expected = {"jaggedrec_hash", "train_hash", "train_static"}
    if importlib.util.find_spec("torchrec") is not None:
        expected |= {"torchrec_mch[1]", "torchrec_mch[10]"}
    assert set(results) == expected
    for r in results.values():
        assert r["median_ms"] > 0 and r["ids_per_s"] > 0
    assert doc["train_ratio_hash_over_static"] > 0
    assert doc["workload"]["num_embeddings"] == 257 and doc["load_avg"] is not None


def test_mc_module_flags_override_the_preset(tmp_path):
    out = tmp_path / "run.json"
    assert cli.main(TINY + ["--dim", "4", "--skip-torchrec", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["workload"]["dim"] == 4
    assert set(doc["results"]) == {"jaggedrec_hash", "train_hash", "train_static"}


def test_same_rows_times_the_static_tables_fed_the_hashed_rows(tmp_path):
    """``--same-rows`` adds a static step fed the rows the hashed tables read, and its ratio:
    the hashed step over it, by wall clock and thread CPU time (both positive, and the ratio
    printed is the one the two providers' medians give)."""
    out = tmp_path / "run.json"
    assert cli.main(TINY + ["--skip-torchrec", "--same-rows", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert set(results) == {"jaggedrec_hash", "train_hash", "train_static", "train_static_same_rows"}
    ratio = doc["train_ratio_hash_over_static_same_rows"]
    assert ratio == round(results["train_hash"]["median_ms"] / results["train_static_same_rows"]["median_ms"], 3)
    assert doc["train_cpu_ratio_hash_over_static_same_rows"] > 0
