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
