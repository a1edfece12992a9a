"""A user-history model on jaggedrec's EmbeddingCollection: each user's watched items (a
jagged sequence) are looked up, padded, and summarised by attention, with a query built from
the user's own embedding. The item table is trained by a fused row-wise Adagrad inside the
backward; the attention layer by an ordinary optimizer.

    python examples/sequence_attention.py --steps 300

It is seeded and runs on one CPU thread by default, so it prints the same losses run after run,
whatever the machine's core count: float sums split over more threads add in another order,
which sends training down another path (after 300 steps the last loss lands in about 0.54-0.58).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import jaggedrec as jr
from jaggedrec import optim


class HistoryModel(nn.Module):
    def __init__(self, num_items: int, num_users: int, dim: int) -> None:
        super().__init__()
        # mixed dims are fine: the item table is wider than the user table
        self.ec = jr.EmbeddingCollection([
            jr.EmbeddingConfig(name="item_table", embedding_dim=dim, num_embeddings=num_items, feature_names=["history"]),
            jr.EmbeddingConfig(name="user_table", embedding_dim=dim // 2, num_embeddings=num_users, feature_names=["user"]),
        ], fused_optimizer=optim.RowWiseAdagrad(lr=0.5))
        self.query = nn.Linear(dim // 2, dim)
        self.attention = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.score = nn.Linear(dim, 1)

    def forward(self, kjt: jr.KeyedJaggedTensor) -> torch.Tensor:
        rows = self.ec(kjt)
        history = rows["history"]                      # [N, dim] rows, lengths [B]
        lengths = history.lengths()
        padded = history.to_padded_dense()             # [B, T, dim], T = the longest history
        pad = torch.arange(padded.shape[1]) >= lengths.unsqueeze(1)  # [B, T] True past each history
        query = self.query(rows["user"].values()).unsqueeze(1)       # one user id per sample: [B, 1, dim]
        summary, _ = self.attention(query, padded, padded, key_padding_mask=pad)
        return self.score(summary.squeeze(1)).squeeze(1)             # [B] logits


def batch(gen: torch.Generator, size: int, num_items: int, num_users: int):
    """Users like the items whose id has their parity; the label says whether most of the history is liked."""
    users = torch.randint(0, num_users, (size,), generator=gen)
    lengths = torch.randint(1, 8, (size,), generator=gen)
    items = torch.randint(0, num_items, (int(lengths.sum()),), generator=gen)
    sample = torch.repeat_interleave(torch.arange(size), lengths)
    liked = (items % 2 == users[sample] % 2).float()
    labels = (torch.zeros(size).index_add_(0, sample, liked) * 2 > lengths).float()
    kjt = jr.KeyedJaggedTensor(["history", "user"], torch.cat([items, users]),
                               lengths=torch.cat([lengths, torch.ones(size, dtype=torch.long)]))
    return kjt, labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the same losses whatever the core count)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)  # a caller in this process (a test) keeps its own


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    num_items, num_users, dim = 200, 50, 16
    model = HistoryModel(num_items, num_users, dim)
    dense = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(args.steps):
        kjt, labels = batch(gen, args.batch_size, num_items, num_users)
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        dense.zero_grad()
        loss.backward()  # also steps the embedding rows this batch read
        dense.step()
        losses.append(loss.item())
    window = max(1, args.steps // 10)
    result = {"first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window}
    print(result)
    return result


if __name__ == "__main__":
    main()
