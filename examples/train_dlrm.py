"""A small DLRM-style click model trained end to end with jaggedrec, on CPU or GPU.

Dense features go through a bottom MLP; sparse features are pooled by an
EmbeddingBagCollection whose fused row-wise Adagrad updates the tables inside the backward;
a dot interaction feeds a top MLP that predicts the click. The data is synthetic but
learnable: each id carries a hidden score, and the click probability follows the scores of
a sample's ids plus a linear term in its dense features.

    python examples/train_dlrm.py                 # CPU, a few hundred steps
    python examples/train_dlrm.py --compile       # the whole model under torch.compile
    python examples/train_dlrm.py --device cuda --batch-size 4096
    python examples/train_dlrm.py --world-size 2  # sharded over 2 processes (gloo; NCCL on CUDA)

With ``--world-size N`` the tables are sharded by ``DistributedModelParallel`` (the planner's
plan) and the dense layers wrapped in DDP; each rank trains on its slice of the same global
batches, so the loss curve is the single-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import jaggedrec
from jaggedrec import KeyedJaggedTensor, optim


class ClickData:
    """Seeded synthetic click logs with a learnable signal.

    Each table's ids have a hidden score; a sample's logit is the mean score of its ids per
    feature, summed over features, plus ``dense @ w``. Ids follow a power law, as real ids do.
    """

    def __init__(self, num_features: int, num_embeddings: int, num_dense: int, pooling: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.num_features, self.num_embeddings, self.num_dense, self.pooling = (
            num_features, num_embeddings, num_dense, pooling)
        self.id_scores = torch.randn(num_features, num_embeddings, generator=self.gen) * 1.5
        self.dense_weight = torch.randn(num_dense, generator=self.gen) * 0.5
        self.keys = [f"cat_{i}" for i in range(num_features)]
        ranks = torch.arange(1, num_embeddings + 1, dtype=torch.float64)
        self.id_probs = (1.0 / ranks) / (1.0 / ranks).sum()

    def batch(self, batch_size: int):
        """Returns dense ``[B, num_dense]``, a KJT of ``num_features`` keys, and labels ``[B]``."""
        dense = torch.randn(batch_size, self.num_dense, generator=self.gen)
        lengths = torch.randint(1, 2 * self.pooling, (self.num_features, batch_size), generator=self.gen)
        num_ids = int(lengths.sum())
        ids = torch.multinomial(self.id_probs, num_ids, replacement=True, generator=self.gen)
        # hidden scores of each id, averaged per bag, summed over features
        feature_of_id = torch.repeat_interleave(torch.arange(self.num_features), lengths.sum(1))
        bag_of_id = torch.repeat_interleave(torch.arange(self.num_features * batch_size), lengths.flatten())
        bag_score = torch.zeros(self.num_features * batch_size).index_add_(0, bag_of_id,
                                                                           self.id_scores[feature_of_id, ids])
        bag_score = bag_score / lengths.flatten()
        logit = bag_score.view(self.num_features, batch_size).sum(0) + dense @ self.dense_weight
        labels = torch.bernoulli(torch.sigmoid(logit), generator=self.gen)
        kjt = KeyedJaggedTensor(keys=self.keys, values=ids, lengths=lengths.flatten())
        return dense, kjt, labels


def mlp(sizes) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DLRM(nn.Module):
    def __init__(self, keys, num_embeddings: int, dim: int, num_dense: int, device: torch.device):
        super().__init__()
        tables = [jaggedrec.EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=num_embeddings,
                                               feature_names=[k], pooling=jaggedrec.PoolingType.MEAN) for k in keys]
        self.ebc = jaggedrec.EmbeddingBagCollection(tables, device=device,
                                                    fused_optimizer=optim.RowWiseAdagrad(lr=0.05))
        self.bottom = mlp([num_dense, 64, dim]).to(device)
        num_vectors = len(keys) + 1
        self.top = mlp([dim + num_vectors * (num_vectors - 1) // 2, 64, 1]).to(device)
        self.dim = dim
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("pairs", rows * num_vectors + cols, persistent=False)
        self.to(device)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, num_dense]`` and a KJT -> ``[B]`` click logits."""
        bottom = self.bottom(dense)                                    # [B, D]
        pooled = self.ebc(kjt).values().view(dense.shape[0], -1, self.dim)  # [B, F, D]
        vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)      # [B, F+1, D]
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)  # [B, (F+1)^2]
        interaction = dots.index_select(1, self.pairs)                 # upper triangle
        return self.top(torch.cat([bottom, interaction], dim=1)).squeeze(1)


def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="step", dynamic_ncols=True)
    except ImportError:
        return None


def rank_slice(kjt: KeyedJaggedTensor, rank: int, world: int) -> KeyedJaggedTensor:
    """Samples ``rank * B/W`` to ``(rank + 1) * B/W`` of every feature of a ``B``-sample KJT."""
    keys, b = kjt.keys(), kjt.stride()
    per = b // world
    lengths = kjt.lengths().view(len(keys), b)
    bag_of_id = torch.repeat_interleave(torch.arange(len(keys) * b), lengths.flatten()) % b
    keep = (bag_of_id >= rank * per) & (bag_of_id < (rank + 1) * per)
    return KeyedJaggedTensor(keys=keys, values=kjt.values()[keep],
                             lengths=lengths[:, rank * per:(rank + 1) * per].flatten())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=512, help="samples per step, over all ranks")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--num-embeddings", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--pooling", type=int, default=3, help="mean ids per bag")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    parser.add_argument("--world-size", type=int, default=1, help="processes to shard the model over")
    parser.add_argument("--losses-out", help="write the per-step losses here, as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.batch_size % args.world_size:
        parser.error(f"--batch-size {args.batch_size} must split evenly over --world-size {args.world_size}")
    if args.world_size > 1 and args.compile:
        parser.error("--compile runs in one process; drop it with --world-size")
    return args


def train(args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict:
    """The training loop; with ``world > 1`` inside an initialised process group, on rank ``rank``."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device, rank) if args.device == "cuda" and world > 1 else torch.device(args.device)
    data = ClickData(args.features, args.num_embeddings, num_dense=13, pooling=args.pooling, seed=args.seed)
    model = DLRM(data.keys, args.num_embeddings, args.dim, 13, device)
    if world > 1:
        from jaggedrec.distributed.model_parallel import DistributedModelParallel
        model = DistributedModelParallel(model, device=device)
        dense_params = [p for name, p in model.named_parameters() if "ebc" not in name]
    else:
        dense_params = list(model.bottom.parameters()) + list(model.top.parameters())
    dense_opt = torch.optim.Adam(dense_params, lr=3e-3)
    step_fn = torch.compile(model, fullgraph=True) if args.compile else model
    loss_fn = nn.BCEWithLogitsLoss()

    losses, bar, window = [], _progress(args.steps) if rank == 0 else None, 20
    per = args.batch_size // world
    start = time.perf_counter()
    for step in range(args.steps):
        dense, kjt, labels = data.batch(args.batch_size)  # the same global batch on every rank
        if world > 1:
            dense, kjt, labels = dense[rank * per:(rank + 1) * per], rank_slice(kjt, rank, world), \
                labels[rank * per:(rank + 1) * per]
        dense, kjt, labels = dense.to(device), kjt.to(device), labels.to(device)
        loss = loss_fn(step_fn(dense, kjt), labels)
        dense_opt.zero_grad()
        loss.backward()  # the embedding tables are updated here, by the fused optimizer
        dense_opt.step()
        value = loss.detach()
        if world > 1:  # the global batch's loss: the mean of the ranks' (equal batch sizes)
            dist.all_reduce(value)
            value = value / world
        losses.append(value.item())
        recent = sum(losses[-window:]) / len(losses[-window:])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{recent:.4f}")
        elif rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {recent:.4f}", flush=True)
    if bar is not None:
        bar.close()
    first = sum(losses[:window]) / min(window, len(losses))
    last = sum(losses[-window:]) / min(window, len(losses))
    seconds = time.perf_counter() - start
    if rank == 0:
        where = f"{args.device}{', compiled' if args.compile else ''}" + (f", {world} ranks" if world > 1 else "")
        print(f"loss: first {window} steps {first:.4f} -> last {window} steps {last:.4f} "
              f"({args.steps} steps, {seconds:.1f} s, {where})")
        if args.losses_out:
            with open(args.losses_out, "w") as f:
                json.dump(losses, f)
    return {"first_loss": first, "last_loss": last, "losses": losses}


def _train_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    """One rank of ``--world-size N``, in the process group that ``run_ranks`` set up."""
    return train(args, rank, world)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.world_size == 1:
        return train(args)
    from jaggedrec.testing import run_ranks

    # each rank a process of its own; a rank that fails stops them all, with its traceback
    per_rank = run_ranks(_train_rank, args.world_size, args, timeout=None, collective_timeout=600,
                         backend="nccl" if args.device == "cuda" else "gloo",
                         threads=max(1, (os.cpu_count() or 1) // args.world_size))
    return per_rank[0]


if __name__ == "__main__":
    main()
