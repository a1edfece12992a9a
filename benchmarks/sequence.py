"""``jaggedrec-bench --module ec``: the unpooled EmbeddingCollection against a loop of
``nn.Embedding``, TorchRec's EmbeddingCollection and FBGEMM's TBE with ``PoolingMode.NONE``.

Every provider gets the same tables and the same batches, and its output (one ``[N_f, dim]``
block per feature) is checked against the loop's before it is timed. Providers take turns,
one step each, on batches that rotate; the table shows medians, GB/s and each provider's
ratio to the loop (``vs loop``: the loop's median over this one).

GB/s counts rows gathered plus rows written, ``2 * N * dim * elem_size`` per forward; a
backward reads the output gradient and writes a weight-gradient row per id, counted the same
again; a training step (forward, backward, SGD on the touched rows) three times the forward's.

Modes: ``forward`` (inference, ``no_grad``), ``backward`` (dense weight gradients), ``train``
(jaggedrec with its fused SGD, the others sparse gradients and ``torch.optim.SGD``, or dense
where they have no sparse ones).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import jaggedrec as jr
from jaggedrec import optim

from .report import machine_info
from .timing import Clock

LEARNING_RATE = 0.01
PRESETS = {
    # one dim, so that TorchRec's module (which needs one dim) runs too
    "sequence": dict(tables=8, rows=100_000, dims=(64,), batch=512, ids_per_bag=20),
    "mixed-dims": dict(tables=6, rows=100_000, dims=(16, 64, 128), batch=512, ids_per_bag=20),
}


@dataclass
class Batch:
    kjt: jr.KeyedJaggedTensor
    per_key: List[torch.Tensor]          # [N_f] ids of each feature
    lengths: List[torch.Tensor]          # [B] of each feature
    grads: List[torch.Tensor]            # [N_f, dim] output gradient of each feature


def make_batches(tables: int, rows: int, dims: Sequence[int], batch: int, ids_per_bag: int, count: int,
                 seed: int) -> List[Batch]:
    """Bags of 0 to ``2 * ids_per_bag`` uniform ids (so about ``ids_per_bag`` on average)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = [torch.randint(0, 2 * ids_per_bag + 1, (batch,), generator=gen) for _ in range(tables)]
        ids = [torch.randint(0, rows, (int(n.sum()),), generator=gen) for n in lengths]
        grads = [torch.randn(i.shape[0], dims[t % len(dims)], generator=gen) for t, i in enumerate(ids)]
        kjt = jr.KeyedJaggedTensor([f"f{t}" for t in range(tables)], torch.cat(ids), lengths=torch.cat(lengths))
        out.append(Batch(kjt, ids, lengths, grads))
    return out


class Provider:
    name = ""

    def skip_reason(self, dims: Sequence[int]) -> Optional[str]:
        return None

    def build(self, weights: List[torch.Tensor], mode: str) -> None:
        raise NotImplementedError

    def forward(self, batch: Batch) -> List[torch.Tensor]:
        """``[N_f, dim]`` rows of each feature."""
        raise NotImplementedError

    def step(self, batch: Batch, mode: str) -> None:
        if mode == "forward":
            with torch.no_grad():
                self.forward(batch)
            return
        self.zero_grad()
        outs = self.forward(batch)
        torch.autograd.backward(outs, batch.grads)
        if mode == "train" and self.optimizer is not None:
            self.optimizer.step()

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None


class EmbeddingLoop(Provider):
    """The baseline: one ``nn.Embedding`` per table, called per feature (TorchRec's unsharded
    module does the same)."""

    name = "embedding_loop"

    def build(self, weights, mode):
        self.module = nn.ModuleList([nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=mode == "train")
                                     for w in weights])
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE) if mode == "train" else None

    def forward(self, batch):
        return [table(ids) for table, ids in zip(self.module, batch.per_key)]


class Jaggedrec(Provider):
    name = "jaggedrec"

    def build(self, weights, mode):
        configs = [jr.EmbeddingConfig(name=f"t{t}", embedding_dim=w.shape[1], num_embeddings=w.shape[0],
                                      feature_names=[f"f{t}"]) for t, w in enumerate(weights)]
        fused = optim.SGD(lr=LEARNING_RATE) if mode == "train" else None
        self.module = jr.EmbeddingCollection(configs, validate=False, fused_optimizer=fused, device=weights[0].device)
        with torch.no_grad():
            for t, w in enumerate(weights):
                self.module.embeddings[f"t{t}"].weight.copy_(w)
        self.optimizer = None  # the fused SGD steps inside the backward

    def forward(self, batch):
        out = self.module(batch.kjt)
        return [out[f"f{t}"].values() for t in range(len(out))]


class TorchRecEC(Provider):
    name = "torchrec_ec"

    def skip_reason(self, dims):
        try:
            import torchrec  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"torchrec not importable ({type(e).__name__})"
        if len(set(dims)) > 1:
            return "TorchRec's EmbeddingCollection needs one dim for all tables (torchrec#1388)"
        return None

    def build(self, weights, mode):
        import torchrec
        configs = [torchrec.EmbeddingConfig(name=f"t{t}", embedding_dim=w.shape[1], num_embeddings=w.shape[0],
                                            feature_names=[f"f{t}"]) for t, w in enumerate(weights)]
        self.module = torchrec.EmbeddingCollection(tables=configs, device=weights[0].device)
        with torch.no_grad():
            for t, w in enumerate(weights):
                self.module.embeddings[f"t{t}"].weight.copy_(w)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE) if mode == "train" else None
        self._kjt = torchrec.KeyedJaggedTensor

    def forward(self, batch):
        kjt = self._kjt(batch.kjt.keys(), batch.kjt.values(), lengths=batch.kjt.lengths())
        out = self.module(kjt)
        return [out[f"f{t}"].values() for t in range(len(out))]


class FbgemmTBE(Provider):
    """FBGEMM's table-batched embedding with ``PoolingMode.NONE``: one row per id."""

    name = "fbgemm_tbe_none"

    def skip_reason(self, dims):
        if torch.cuda.is_available():
            return "set up here for fbgemm_gpu's CPU build (EmbeddingLocation.HOST) only"
        try:
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: F401
                SplitTableBatchedEmbeddingBagsCodegen)
        except Exception as e:  # noqa: BLE001
            return f"fbgemm_gpu not importable ({type(e).__name__})"
        if len(set(dims)) > 1:
            return "PoolingMode.NONE needs one dim for all tables"
        return None

    def build(self, weights, mode):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                            SplitTableBatchedEmbeddingBagsCodegen)
        specs = [(w.shape[0], w.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU) for w in weights]
        self.module = SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=EmbOptimType.EXACT_SGD,
                                                            learning_rate=LEARNING_RATE, pooling_mode=PoolingMode.NONE)
        with torch.no_grad():
            for t, w in enumerate(weights):
                self.module.split_embedding_weights()[t].copy_(w)
        self.optimizer = None
        self._dims = [w.shape[1] for w in weights]

    def forward(self, batch):
        kjt = batch.kjt
        rows = self.module(kjt.values().long(), kjt.offsets().long())  # [N, dim], ids in KJT order
        return list(rows.split([int(i.shape[0]) for i in batch.per_key]))

    def step(self, batch, mode):
        if mode == "forward":
            with torch.no_grad():
                self.forward(batch)
            return
        if mode == "backward":
            raise RuntimeError("FBGEMM's TBE fuses its optimizer into the backward: no plain backward to time")
        torch.autograd.backward(self.forward(batch), batch.grads)


PROVIDERS = (EmbeddingLoop, Jaggedrec, TorchRecEC, FbgemmTBE)


def run(preset: str, mode: str, repeats: int, batches: int, seed: int,
        overrides: Optional[Dict[str, int]] = None, device: str = "cpu") -> Dict[str, object]:
    shape = dict(PRESETS[preset], **(overrides or {}))
    dims = [shape["dims"][t % len(shape["dims"])] for t in range(shape["tables"])]
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(shape["rows"], d, generator=gen) * 0.1).to(device) for d in dims]
    data = [Batch(b.kjt.to(device), [i.to(device) for i in b.per_key], [n.to(device) for n in b.lengths],
                  [g.to(device) for g in b.grads])
            for b in make_batches(shape["tables"], shape["rows"], dims, shape["batch"], shape["ids_per_bag"], batches,
                                  seed + 1)]
    clock = Clock(device)
    results: Dict[str, Dict[str, object]] = {}
    active: List[Provider] = []
    reference = EmbeddingLoop()
    reference.build(weights, "forward")
    with torch.no_grad():
        expected = reference.forward(data[0])
    for cls in PROVIDERS:
        p = cls()
        reason = p.skip_reason(dims)
        if reason is None:
            try:
                p.build(weights, mode)
                with torch.no_grad():
                    got = p.forward(data[0])
                bad = [t for t, (a, b) in enumerate(zip(got, expected)) if not torch.allclose(a.float(), b, atol=1e-6)]
                if bad:
                    reason = f"wrong output for features {bad}"
                else:
                    p.step(data[0], mode)  # warm-up, and a first check that the mode runs
            except Exception as e:  # noqa: BLE001 - report and go on
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if reason is not None:
            results[p.name] = {"status": "skipped", "reason": reason}
            continue
        active.append(p)
        results[p.name] = {"status": "ok", "samples": []}
    for r in range(repeats):  # providers take turns, one step each, on a rotating batch
        batch = data[r % len(data)]
        for p in (active if r % 2 == 0 else active[::-1]):
            results[p.name]["samples"].append(clock.time_ms(lambda: p.step(batch, mode)))
    ids = sum(int(b.kjt.values().shape[0]) for b in data) / len(data)
    bytes_forward = sum(2 * ids / len(dims) * d * 4 for d in dims)
    moved = bytes_forward * {"forward": 1, "backward": 2, "train": 3}[mode]
    base = results.get(EmbeddingLoop.name, {})
    base_ms = statistics.median(base["samples"]) if base.get("samples") else None
    for name, r in results.items():
        if r["status"] != "ok":
            continue
        r["median_ms"] = statistics.median(r["samples"])
        r["gbps"] = moved / r["median_ms"] / 1e6
        r["vs_loop"] = base_ms / r["median_ms"] if base_ms else None
    return {"preset": preset, "mode": mode, "device": device, "shape": dict(shape, dims=list(shape["dims"])),
            "ids_per_batch": ids, "results": results}


def format_result(result: Dict[str, object]) -> str:
    s = result["shape"]
    lines = [f"{s['tables']} tables x {s['rows']:,} rows, dims {s['dims']}, batch {s['batch']}, "
             f"~{s['ids_per_bag']} ids/bag ({result['ids_per_batch']:.0f} ids), {result['mode']}, {result['device']}",
             f"{'provider':18} {'status':8} {'median ms':>10} {'GB/s':>7} {'vs loop':>8}"]
    for name, r in result["results"].items():
        if r["status"] != "ok":
            lines.append(f"{name:18} {'skipped':8} {r['reason']}")
            continue
        ratio = f"{r['vs_loop']:.2f}x" if r["vs_loop"] else "-"
        lines.append(f"{name:18} {'ok':8} {r['median_ms']:>10.3f} {r['gbps']:>7.2f} {ratio:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaggedrec-bench --module ec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["sequence", "mixed-dims"])
    parser.add_argument("--mode", choices=("forward", "backward", "train"), nargs="+",
                        default=["forward", "backward", "train"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    for flag in ("tables", "rows", "batch", "ids-per-bag"):
        parser.add_argument(f"--{flag}", type=int, help="override the preset's")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("tables", "rows", "batch", "ids_per_bag")
                 if getattr(args, k) is not None}
    machine = machine_info(args.device)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    print(f"jaggedrec-bench --module ec on {where}: torch {machine['torch']}, triton {machine['triton']}")
    out = []
    for preset in args.preset:
        for mode in args.mode:
            result = run(preset, mode, args.repeats, args.batches, args.seed, overrides, args.device)
            print()
            print(format_result(result))
            out.append(result)
    print("\nGB/s: rows gathered plus rows written (backward twice, train three times the forward's bytes) per "
          "median step. vs loop: the nn.Embedding loop's median over this one. Providers alternate, batches rotate.")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": machine, "runs": out}, f, indent=1)
    wrong = any(r["status"] == "skipped" and r["reason"].startswith("wrong output")
                for res in out for r in res["results"].values())
    return 1 if wrong else 0
