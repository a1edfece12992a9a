"""The floor under the FPEBC forward on CPU: one torch.nn.functional.embedding_bag over the
pooling preset's 8 x 100k x 64 tables, unweighted and with ready-made per-id weights, and the
ways to build the [N] position weights (table[key base + position in bag]) with torch ops.

Usage: python floor.py [POOLING_FACTOR ...]   (one torch thread; providers alternate per round)
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
K, B, R, D, ROUNDS = 8, 1024, 100_000, 64, 30


def forms(lengths, offsets, n, table, base):
    shift64 = base.repeat_interleave(B) - offsets[:-1]
    shift32, lengths32 = shift64.int(), lengths.int()
    arange64, arange32 = torch.arange(n), torch.arange(n, dtype=torch.int32)
    padded = table.view(K, -1).repeat_interleave(B, 0)  # [K*B, L] each bag's key's weights

    def repeat64():
        return table.index_select(0, shift64.repeat_interleave(lengths, output_size=n) + arange64)

    def repeat32():
        index = shift32.repeat_interleave(lengths32, output_size=n)
        return table.index_select(0, index.add_(arange32))

    def cumsum32():  # jaggedrec's gather_position_weights
        change = torch.diff(shift32, prepend=shift32.new_zeros(1))
        steps = torch.ones(n + 1, dtype=torch.int32)
        steps[0] = 0
        steps.index_add_(0, offsets[:-1], change)
        return table.index_select(0, steps[:n].cumsum(0, dtype=torch.int32))

    def masked():
        mask = torch.arange(padded.shape[1], dtype=torch.int32) < lengths32.unsqueeze(1)
        return padded[mask]

    out = {"repeat_interleave int64": repeat64, "repeat_interleave int32": repeat32, "cumsum int32": cumsum32,
           "masked padded": masked}
    try:
        import fbgemm_gpu  # noqa: F401  (TorchRec's route: offsets_range, then a gather)

        def offsets_range():
            positions = torch.ops.fbgemm.offsets_range(offsets, n)
            return table.index_select(0, positions + base.repeat_interleave(lengths.view(K, B).sum(1), output_size=n))
        out["fbgemm offsets_range"] = offsets_range
    except ImportError:
        pass
    return out


def main(pooling_factors):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(K * R, D, generator=gen)
    for pf in pooling_factors:
        limit = int(2 * pf) + 1
        lengths = (torch.rand(K * B, generator=gen) * limit).long()
        n = int(lengths.sum())
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        ids = torch.randint(0, R, (n,), generator=gen) + torch.arange(K).repeat_interleave(B).repeat_interleave(
            lengths) * R
        table = torch.rand(K * limit, generator=gen)
        base = torch.arange(K) * limit
        builds = forms(lengths, offsets, n, table, base)
        expected = builds["repeat_interleave int64"]()
        for name, f in builds.items():
            assert torch.equal(f(), expected), name
        given = expected.clone()
        steps = {"embedding_bag unweighted": lambda: F.embedding_bag(ids, weight, offsets, include_last_offset=True,
                                                                     mode="sum"),
                 "embedding_bag weights given": lambda: F.embedding_bag(ids, weight, offsets, mode="sum",
                                                                        include_last_offset=True,
                                                                        per_sample_weights=given)}
        steps.update({f"build: {k}": v for k, v in builds.items()})
        times = {k: [] for k in steps}
        for _ in range(ROUNDS):
            for k, f in steps.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        unweighted = med["embedding_bag unweighted"]
        print(f"\npooling factor {pf}: {n} ids, {K} x {R} x {D} fp32, batch {B}, median of {ROUNDS}, ms "
              f"(x the unweighted embedding_bag)")
        for k, v in med.items():
            print(f"  {k:32s} {v:8.3f}  {v / unweighted:5.3f}x")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [20, 100])
