"""``jaggedrec-bench --dtype int8|int4``: quantized inference through the main CLI, on CPU on tiny
shapes: every provider checked against the fp32 module within the rounding bound, then timed;
the tables' bytes per provider; bad flag combinations are usage errors."""

import json

import pytest
import torch

from jaggedrec.benchmarks import cli
from jaggedrec.benchmarks.providers.quant import JaggedrecFp32, JaggedrecQuant, quant_providers, rounding_bound
from jaggedrec.benchmarks.workload import Workload, bytes_per_step, make_batches, reference_tables

# 3 tables of dims 16, 32, 16: even (torch's 4-bit ops pack two codes a byte), and wide enough that
# TorchRec's rows, padded to 16 bytes, are smaller in INT4 than in INT8
TINY = ["--device", "cpu", "--tables", "3", "--num-embeddings", "60", "--dim", "16,32", "--batch-size", "8",
        "--pooling-factor", "2", "--bag-size", "random", "--repeats", "3", "--batches", "2", "--no-progress"]


@pytest.mark.parametrize("weighted", [False, True])
def test_int8_and_int4_in_one_run_every_provider_verifies(tmp_path, capsys, weighted):
    out = tmp_path / "quant.json"
    args = TINY + ["--dtype", "int8,int4", "--output", str(out)] + (["--weighted"] if weighted else [])
    assert cli.main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"]["dtype"] for r in runs] == ["int8", "int4"]
    names = [p.name for p in quant_providers()]
    table_bytes = {}
    for run in runs:
        providers = run["providers"]
        assert list(providers) == names
        for name, r in providers.items():
            if name == "torchrec_quant" and r["status"] == "skipped":  # TorchRec or FBGEMM not installed
                assert "not importable" in r["reason"]
                continue
            assert r["status"] == "ok", (name, r)
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], name
            assert r["peak_mem_mb"] is not None and r["table_bytes"] > 0, name
            table_bytes[run["config"]["dtype"], name] = r["table_bytes"]
        assert providers["jaggedrec_fp32"]["speedup_vs_loop"] == pytest.approx(1.0)
    fp32 = table_bytes["int8", "jaggedrec_fp32"]
    assert fp32 >= 60 * 64 * 4  # 60 rows of 64 fp32 values in all
    for name in ("jaggedrec_quant", "torch_ops_loop", "torchrec_quant"):
        if ("int8", name) in table_bytes:
            assert table_bytes["int4", name] < table_bytes["int8", name] < fp32, name
    # row_align 1: INT8 rows are dim + 8 bytes, INT4 ceil(dim/2) + 4, as torch's own prepacked rows;
    # jaggedrec's module also holds its [3 features] int64 count of skipped ids, as every collection does
    for dtype, row_bytes in (("int8", 24 + 40 + 24), ("int4", 12 + 20 + 12)):
        assert table_bytes[dtype, "torch_ops_loop"] == table_bytes[dtype, "jaggedrec_quant"] - 3 * 8 == 60 * row_bytes
    printed = capsys.readouterr().out
    assert "vs fp32" in printed and "table MB" in printed and "rounding bound" in printed


class _TwiceTheBoundOff(JaggedrecQuant):
    """jaggedrec.quant's output pushed past the rounding bound, by twice the bound."""

    def __init__(self):
        super().__init__()
        self.name = "twice_the_bound_off"

    def build(self, tables, w):
        super().build(tables, w)
        self._tables, self._w = tables, w

    def forward(self, batch):
        return super().forward(batch) + 2 * rounding_bound(self._w, self._tables, batch)


def test_past_the_rounding_bound_is_wrong_and_not_timed(tmp_path):
    out = tmp_path / "wrong.json"
    rc = cli.main(TINY + ["--dtype", "int4", "--output", str(out)],
                  provider_factory=lambda: [JaggedrecFp32(), JaggedrecQuant(), _TwiceTheBoundOff()])
    assert rc == 1
    providers = json.loads(out.read_text())["runs"][0]["providers"]
    assert providers["jaggedrec_quant"]["status"] == "ok"
    wrong = providers["twice_the_bound_off"]
    assert wrong["status"] == "wrong" and "int4's rounding bound" in wrong["reason"]
    assert wrong["median_ms"] is None and wrong["samples_ms"] == []


def test_rounding_bound_covers_jaggedrecs_quantized_output():
    w = Workload(tables=2, num_embeddings=40, dims=(4, 6), batch_size=16, pooling_factor=3, bag_size="random",
                 dtype="int4", weighted=True)
    tables, (batch,) = reference_tables(w), make_batches(w, 1)
    fp32, q = JaggedrecFp32(), JaggedrecQuant()
    fp32.build(tables, w)
    q.build(tables, w)
    with torch.no_grad():
        err = (q.forward(batch) - fp32.forward(batch)).abs()
    bound = rounding_bound(w, tables, batch)
    assert bound.shape == err.shape == (16, 10)
    assert (err <= bound + 1e-7).all() and (bound > 0).any()
    # INT4 rows gathered: ceil(dim/2) + 4 bytes each; the fp32 output as for float tables
    ids = batch.ids_per_feature
    assert bytes_per_step(w, ids) == ids[0] * 6 + ids[1] * 7 + 16 * 10 * 4


@pytest.mark.parametrize("bad,message", [
    (["--dtype", "int8", "--mode", "train"], "--mode forward"),
    (["--dtype", "int4", "--mode", "backward"], "--mode forward"),
    (["--dtype", "int8,fp32"], "mixes float and quantized"),
    (["--dtype", "int3"], "dtypes are"),
    (["--module", "ec", "--dtype", "int8"], "no --module ec"),
])
def test_bad_quantized_flags_are_usage_errors(capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + bad)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_quantized_workload_is_forward_only():
    with pytest.raises(ValueError, match="mode must be forward"):
        Workload(dtype="int8", mode="train")
    w = Workload(dtype="int4")
    assert w.quantized and w.torch_dtype == torch.float32  # the reference tables each provider quantizes
