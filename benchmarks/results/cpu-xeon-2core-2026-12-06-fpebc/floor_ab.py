"""The FPEBC forward against its floor on CPU, in thread CPU time (for a loaded machine):
one process, the rows interleaved round by round (order reversed every other round), medians.

Rows, on the `pooling` preset's workloads (8 x 100k x 64 tables, batch 1024, L = 20/50/100):
- unweighted: jaggedrec's EBC (the 1.05x goal's base);
- weighted_ones / weighted_psw: the weighted EBC fed ready-made [N] weights (ones, as the
  benchmark's jaggedrec_weighted, and the batch's real position weights);
- build: the [N] position weights alone (position_pooled.per_id_position_weights: one int32
  running sum, one gather);
- fpebc: the FeatureProcessedEmbeddingBagCollection (the op builds the weights inside);
- fpebc_kjt_route: the same processors and collection by the weighted-KJT route.

Usage: python floor_ab.py [ROUNDS]   (one torch thread)
"""

import statistics
import sys
import time

import torch

import jaggedrec as jr
from jaggedrec.benchmarks.providers.fp import fp_providers
from jaggedrec.benchmarks.workload import Workload, make_batches, reference_tables
from jaggedrec.modules import feature_processor_
from jaggedrec.modules.fp_embedding_modules import process_features
from jaggedrec.ops import position_pooled

torch.set_num_threads(1)


def rows(pf: int):
    w = Workload(tables=8, num_embeddings=100_000, dims=(64,), batch_size=1024, bag_size="random",
                 pooling_factor=pf, mode="forward")
    tables, batches = reference_tables(w), make_batches(w, 4)
    provs = {p.name: p for p in fp_providers() if p.name in ("jaggedrec[torch]", "jaggedrec_weighted",
                                                           "jaggedrec_fpebc")}
    for p in provs.values():
        p.build(tables, w)
    fp, weighted = provs["jaggedrec_fpebc"], provs["jaggedrec_weighted"]
    processors, ebc = fp.module.split()
    position = feature_processor_.position_weight_tables(processors)
    kjts = [b.jaggedrec_kjt(fp.keys) for b in batches]
    layouts = [feature_processor_.keyed_position_table(k, position, "floor") for k in kjts]

    def build(i):
        k = kjts[i]
        return position_pooled.per_id_position_weights(layouts[i][0], k.lookup_offsets(), layouts[i][1], 8,
                                                       k.values().shape[0])

    psws = [build(i) for i in range(4)]

    def weighted_psw(i):
        b = batches[i]
        return weighted.module(jr.KeyedJaggedTensor(weighted.keys, b.values, psws[i], lengths=b.lengths,
                                                    offsets=b.offsets)).values()

    return {"unweighted": lambda i: provs["jaggedrec[torch]"].forward(batches[i]),
            "weighted_ones": lambda i: weighted.forward(batches[i]), "weighted_psw": weighted_psw, "build": build,
            "fpebc": lambda i: fp.forward(batches[i]),
            "fpebc_kjt_route": lambda i: ebc(process_features(processors, kjts[i], "floor")).values()}


def main(rounds: int) -> None:
    for pf in (20, 50, 100):
        fns = rows(pf)
        times = {k: [] for k in fns}
        with torch.no_grad():
            assert torch.equal(fns["fpebc"](0), fns["fpebc_kjt_route"](0))
            for r in range(rounds + 3):
                order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
                for name, f in order:
                    start = time.thread_time()
                    f(r % 4)
                    if r >= 3:
                        times[name].append(time.thread_time() - start)
        base = statistics.median(times["unweighted"])
        print(f"L={pf}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms ({statistics.median(v) / base:.3f}x)"
                                      for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
