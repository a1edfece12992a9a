"""``jaggedrec-bench --mode train --optimizer NAME``: jaggedrec's fused step beside FBGEMM's TBE
with the same EmbOptimType, on a tiny CPU shape."""

import json

import pytest

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.workload import Workload

TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "50", "--dim", "4,8", "--batch-size", "8",
        "--pooling-factor", "2", "--repeats", "3", "--batches", "2", "--no-progress", "--mode", "train",
        "--providers", "eb_loop,jaggedrec[torch],fbgemm_tbe"]


def _run(tmp_path, optimizer):
    out = tmp_path / f"{optimizer}.json"
    assert cli.main(TINY + ["--optimizer", optimizer, "--output", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["config"]["optimizer"] == optimizer
    return run["providers"]


def test_each_library_steps_the_named_optimizer(tmp_path, capsys):
    providers = _run(tmp_path, "exact_adagrad")
    assert providers["jaggedrec[torch]"]["status"] == "ok"
    assert providers["eb_loop"]["status"] == "skipped" and "exact_sgd only" in providers["eb_loop"]["reason"]
    fbgemm = providers["fbgemm_tbe"]
    assert fbgemm["status"] == "ok" or "fbgemm" in fbgemm["reason"].lower()
    printed = capsys.readouterr().out
    assert "EXACT_ADAGRAD" in printed and "fused Adagrad inside backward" in printed


def test_an_optimizer_fbgemm_steps_on_gpu_only_is_skipped_there(tmp_path):
    providers = _run(tmp_path, "partial_rowwise_lamb")
    assert providers["jaggedrec[torch]"]["status"] == "ok"
    reason = providers["fbgemm_tbe"]["reason"]
    assert "GPU only" in reason or "fbgemm" in reason.lower()


def test_unknown_optimizer_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + ["--optimizer", "shampoo"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="optimizer"):
        Workload(optimizer="shampoo")
