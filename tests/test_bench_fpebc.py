"""``jaggedrec-bench --module fpebc`` end to end on a tiny CPU shape: every provider is checked
against the unweighted loop (position weights start at 1) and timed, in forward and train
mode; bad flag combinations are usage errors."""

import json

import pytest

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.providers.fp import fp_providers

TINY = ["--module", "fpebc", "--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8",
        "--batch-size", "8", "--pooling-factor", "3", "--bag-size", "random", "--repeats", "3", "--batches", "2",
        "--no-progress"]


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_fpebc_module_end_to_end(tmp_path, mode):
    out = tmp_path / "run.json"
    assert cli.main(TINY + ["--mode", mode, "--output", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    providers = run["providers"]
    assert list(providers) == [p.name for p in fp_providers()]
    for name in ("eb_loop", "jaggedrec[torch]", "jaggedrec_weighted", "jaggedrec_fpebc"):
        assert providers[name]["status"] == "ok", (name, providers[name])
    for name, r in providers.items():
        assert r["status"] in ("ok", "skipped"), (name, r)


def test_fpebc_module_refuses_weighted_batches(tmp_path):
    out = tmp_path / "run.json"
    assert cli.main(TINY + ["--weighted", "--output", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert "--weighted" in run["providers"]["jaggedrec_fpebc"]["reason"]


def test_fpebc_module_refuses_quantized_tables():
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + ["--dtype", "int8"])
    assert e.value.code == 2
