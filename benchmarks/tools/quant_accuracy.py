"""Accuracy and bytes of jaggedrec.quant against the fp32 collection it was built from.

    python benchmarks/tools/quant_accuracy.py [--dims 16 64 128] [--bag 20] [--batch 2048]

Tables are ``N(0, 1)`` rows (``--rows`` each); bags of ``--bag`` uniform ids. Prints, per storage
type and dim, the module's bytes against fp32's, each pooled bag's relative error
``||q - f|| / ||f||`` (mean and max over the bags; an element-wise ratio would be ruled by the
elements that happen to sum near zero), and the largest element error as a fraction of the
bound the tests check (``tests/test_quant.py``).
"""

from __future__ import annotations

import argparse

import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.quant.rowwise import error_bound


def measure(dim: int, data_type: DataType, rows: int, bag: int, batch: int, row_align: int, seed: int = 0):
    torch.manual_seed(seed)
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows,
                                                           feature_names=["f"], weight_init_min=-1.0,
                                                           weight_init_max=1.0)])
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.normal_()
    q = quant.EmbeddingBagCollection.from_float(ebc, data_type, row_align=row_align)
    ids = torch.randint(0, rows, (batch * bag,))
    kjt = jr.KeyedJaggedTensor(["f"], ids, lengths=torch.full((batch,), bag))
    ref, got = ebc(kjt).values(), q(kjt).values()
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    bound = error_bound(q.table_rows(0), data_type, dim)[ids].view(batch, bag).sum(1, keepdim=True)
    return {"bytes": sum(b.numel() for b in q.buffers()), "fp32_bytes": rows * dim * 4,
            "rel_mean": rel.mean().item(), "rel_max": rel.max().item(),
            "of_bound": ((got - ref).abs() / bound).max().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--bag", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args(argv)
    print(f"{'type':5} {'dim':>4} {'row_align':>9} {'bytes vs fp32':>14} {'bag rel err mean':>17} {'max':>9} "
          f"{'max err / bound':>16}")
    for data_type in (DataType.INT8, DataType.INT4, DataType.FP16):
        for dim in args.dims:
            for row_align in (1, 16):
                r = measure(dim, data_type, args.rows, args.bag, args.batch, row_align)
                print(f"{data_type.value:5} {dim:>4} {row_align:>9} {r['bytes'] / r['fp32_bytes']:>14.3f} "
                      f"{r['rel_mean']:>17.2e} {r['rel_max']:>9.2e} {r['of_bound']:>16.3f}")


if __name__ == "__main__":
    main()
