"""Forward speed of jaggedrec.quant against the fp32 module, TorchRec's quantized collection and
torch's own quantized embedding-bag ops in a per-table loop, at the pooled benchmark's presets.

    python -m jaggedrec.benchmarks.quant_speed [--preset dlrm pooling] [--repeats 15] [--device cuda]

On CUDA the quantized module runs its Triton kernel (rows 16-byte aligned) against the fp32
module's; torch's quantized ops and TorchRec's module are CPU-only here, so they are skipped.

Every provider pools the same batches (rotating) from the same fp32 tables, quantized by each
its own way; providers take turns, one forward each (``no_grad``), and the table shows medians,
each provider's ratio to the fp32 jaggedrec module (``vs fp32``) and its tables' bytes. The
outputs are checked against the fp32 module first, within 1% (INT8) or 10% (INT4, whose half
step is 1/30 of a row's range) of the largest pooled magnitude; the tests check the exact bound.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List, Optional, Sequence

import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.configs import DataType

from .presets import preset_workloads
from .report import machine_info
from .timing import Clock
from .workload import Workload, make_batches, reference_tables

TYPES = {"int8": DataType.INT8, "int4": DataType.INT4}


class Provider:
    name = ""

    def skip_reason(self) -> Optional[str]:
        return None

    def forward(self, kjt: jr.KeyedJaggedTensor, batch) -> torch.Tensor:
        raise NotImplementedError

    def table_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.module.parameters(), *self.module.buffers()))


class Float(Provider):
    name = "jaggedrec fp32"

    def __init__(self, w: Workload, tables: Sequence[torch.Tensor]) -> None:
        self.module = jr.EmbeddingBagCollection(w.table_configs(), validate=False, device=w.device)
        with torch.no_grad():
            for t, table in enumerate(tables):
                self.module.embedding_bags[f"t{t}"].weight.copy_(table)

    def forward(self, kjt, batch):
        return self.module(kjt).values()


class Quantized(Provider):
    def __init__(self, fp32: Float, data_type: DataType) -> None:
        self.name = f"jaggedrec {data_type.value.lower()}"
        self.module = quant.EmbeddingBagCollection.from_float(fp32.module, data_type, validate=False)

    def forward(self, kjt, batch):
        return self.module(kjt).values()


class TorchLoop(Provider):
    """torch's row-wise quantized embedding-bag op, one call per table (their own prepacked rows)."""

    def __init__(self, tables: Sequence[torch.Tensor], data_type: DataType) -> None:
        self.name = f"torch ops loop {data_type.value.lower()}"
        self._error = "torch's quantized embedding-bag ops run on CPU" if tables[0].is_cuda else None
        if self._error:
            return
        pack = (torch.ops.quantized.embedding_bag_byte_prepack if data_type == DataType.INT8
                else torch.ops.quantized.embedding_bag_4bit_prepack)
        self.op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if data_type == DataType.INT8
                   else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
        self.packed = [pack(t.float()) for t in tables]

    def forward(self, kjt, batch):
        starts = batch.key_offsets
        b = batch.lengths.shape[0] // len(self.packed)
        out = []
        for t, rows in enumerate(self.packed):
            ids = batch.values[starts[t]:starts[t + 1]]
            offsets = batch.offsets[t * b:(t + 1) * b + 1] - starts[t]
            out.append(self.op(rows, ids, offsets, False, 0, False, None, None, True))
        return torch.cat(out, dim=1)

    def skip_reason(self):
        return self._error

    def table_bytes(self) -> int:
        return sum(p.numel() for p in self.packed)


class TorchRecQuant(Provider):
    def __init__(self, w: Workload, tables: Sequence[torch.Tensor], data_type: DataType) -> None:
        self.name = f"torchrec quant {data_type.value.lower()}"
        self._error = "set up here for TorchRec's CPU quantized module only" if w.device == "cuda" else None
        if self._error:
            return
        try:
            import torchrec
            from torchrec.quant.embedding_modules import EmbeddingBagCollection as TorchRecQEBC
        except Exception as e:  # noqa: BLE001
            self._error = f"torchrec not importable ({type(e).__name__})"
            return
        configs = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                                               num_embeddings=c.num_embeddings, feature_names=c.feature_names)
                   for c in w.table_configs()]
        ebc = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        with torch.no_grad():
            for t, table in enumerate(tables):
                ebc.embedding_bags[f"t{t}"].weight.copy_(table)
        weight = torch.qint8 if data_type == DataType.INT8 else torch.quint4x2
        ebc.qconfig = torch.ao.quantization.QConfig(
            activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
            weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=weight))
        self.module = TorchRecQEBC.from_float(ebc)
        self._kjt = torchrec.KeyedJaggedTensor

    def skip_reason(self):
        return self._error

    def forward(self, kjt, batch):
        return self.module(self._kjt(kjt.keys(), kjt.values(), lengths=kjt.lengths())).values()


def run(w: Workload, repeats: int, batches: int) -> Dict[str, Dict[str, object]]:
    tables = reference_tables(w)
    data = make_batches(w, batches)
    fp32 = Float(w, tables)
    providers: List[Provider] = [fp32]
    for data_type in TYPES.values():
        providers += [Quantized(fp32, data_type), TorchLoop(tables, data_type), TorchRecQuant(w, tables, data_type)]
    kjts = [b.jaggedrec_kjt(w.keys) for b in data]
    results: Dict[str, Dict[str, object]] = {}
    active = []
    with torch.no_grad():
        expected = fp32.forward(kjts[0], data[0])
        for p in providers:
            reason = p.skip_reason()
            if reason is None:
                got = p.forward(kjts[0], data[0])
                worst = float((got - expected).abs().max())
                share = 0.1 if "int4" in p.name else 0.01
                if worst > share * float(expected.abs().max()):
                    reason = f"output off by {worst:.3g} (more than {share:.0%} of the largest pooled value)"
            if reason is not None:
                results[p.name] = {"status": "skipped", "reason": reason}
                continue
            active.append(p)
            results[p.name] = {"status": "ok", "samples": [], "bytes": p.table_bytes()}
        clock = Clock(w.device)
        for r in range(repeats):
            i = r % len(data)
            for p in (active if r % 2 == 0 else active[::-1]):
                results[p.name]["samples"].append(clock.time_ms(lambda: p.forward(kjts[i], data[i])))
    base = statistics.median(results[fp32.name]["samples"])
    for r in results.values():
        if r["status"] == "ok":
            r["median_ms"] = statistics.median(r["samples"])
            r["vs_fp32"] = base / r["median_ms"]
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["dlrm", "pooling"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--num-embeddings", type=int, help="override the presets' rows per table")
    parser.add_argument("--batch-size", type=int, help="override the presets' batch size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    machine = machine_info(args.device)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    print(f"quant_speed on {where}: torch {machine['torch']}, triton {machine['triton']}")
    for preset in args.preset:
        for w in preset_workloads(preset, args.device):
            changes = {k: v for k, v in (("num_embeddings", args.num_embeddings), ("batch_size", args.batch_size))
                       if v is not None}
            w = w.replace(mode="forward", **changes)
            print(f"\n{preset}: {w.describe()}")
            print(f"{'provider':24} {'median ms':>10} {'vs fp32':>8} {'table MB':>9}")
            for name, r in run(w, args.repeats, args.batches).items():
                if r["status"] != "ok":
                    print(f"{name:24} skipped: {r['reason']}")
                else:
                    print(f"{name:24} {r['median_ms']:>10.3f} {r['vs_fp32']:>7.2f}x {r['bytes'] / 2**20:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
