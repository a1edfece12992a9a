"""The TorchRec intro tutorial, run with jaggedrec in place of torchrec.

Source: https://docs.pytorch.org/tutorials/intermediate/torchrec_intro_tutorial.html
(``../shared/reference/torchrec_intro_tutorial.txt``). The tutorial draws its weights
with ``torch.rand``; its printed draw is used here so that the outputs match it.

    python examples/torchrec_intro.py
"""

import inspect

import torch

import jaggedrec
from jaggedrec import JaggedTensor, KeyedJaggedTensor

# The weights the tutorial printed.
TUTORIAL_WEIGHTS = torch.tensor([
    [0.4448, 0.0612, 0.2466, 0.6927],
    [0.0136, 0.7638, 0.5630, 0.5855],
    [0.1150, 0.9323, 0.9310, 0.5350],
    [0.2111, 0.3665, 0.4667, 0.3583],
    [0.1836, 0.8943, 0.9763, 0.5469],
    [0.1469, 0.5513, 0.7553, 0.8704],
    [0.0461, 0.1049, 0.5266, 0.1406],
    [0.9534, 0.1321, 0.7688, 0.7059],
    [0.4702, 0.0154, 0.3434, 0.2470],
    [0.4574, 0.4110, 0.8286, 0.9001],
])


def embeddings_recap() -> torch.Tensor:
    """The tutorial's first part: plain torch lookups, and the same pooled row from jaggedrec."""
    num_embeddings, embedding_dim = 10, 4
    weights = TUTORIAL_WEIGHTS.clone()
    print("Weights: ", weights)
    embedding_collection = torch.nn.Embedding(num_embeddings, embedding_dim, _weight=weights)
    embedding_bag_collection = torch.nn.EmbeddingBag(num_embeddings, embedding_dim, _weight=weights)
    print("Embedding Collection Table: ", embedding_collection.weight)
    print("Embedding Bag Collection Table: ", embedding_bag_collection.weight)

    ids = torch.tensor([[1, 3]])
    print("Input row IDS: ", ids)
    embeddings = embedding_collection(ids)
    print("Embedding Collection Results: ")
    print(embeddings)
    print("Shape: ", embeddings.shape)
    pooled_embeddings = embedding_bag_collection(ids)
    print("Embedding Bag Collection Results: ")
    print(pooled_embeddings)
    print("Shape: ", pooled_embeddings.shape)
    print("Mean: ", torch.mean(embedding_collection(ids), dim=1))

    # The same lookup through jaggedrec: a MEAN table holding these weights.
    table = jaggedrec.EmbeddingBagCollection(tables=[jaggedrec.EmbeddingBagConfig(
        name="t", embedding_dim=embedding_dim, num_embeddings=num_embeddings, feature_names=["ids"],
        pooling=jaggedrec.PoolingType.MEAN)])
    table.load_state_dict({"embedding_bags.t.weight": weights})
    kjt = KeyedJaggedTensor(keys=["ids"], values=torch.tensor([1, 3]), lengths=torch.tensor([2]))
    jagged_pooled = table(kjt)["ids"]
    print("jaggedrec MEAN pooling: ", jagged_pooled)
    return jagged_pooled


def build_ebc() -> jaggedrec.EmbeddingBagCollection:
    ebc = jaggedrec.EmbeddingBagCollection(
        device="cpu",
        tables=[
            jaggedrec.EmbeddingBagConfig(
                name="product_table",
                embedding_dim=64,
                num_embeddings=4096,
                feature_names=["product"],
                pooling=jaggedrec.PoolingType.SUM,
            ),
            jaggedrec.EmbeddingBagConfig(
                name="user_table",
                embedding_dim=64,
                num_embeddings=4096,
                feature_names=["user"],
                pooling=jaggedrec.PoolingType.SUM,
            ),
        ],
    )
    print(ebc.embedding_bags)
    print(inspect.getsource(ebc.forward))
    return ebc


def main() -> dict:
    recap = embeddings_recap()
    ebc = build_ebc()

    # Batch size 2: 1 id in example 1, 2 ids in example 2.
    id_list_feature_lengths = torch.tensor([1, 2])
    id_list_feature_values = torch.tensor([5, 7, 1])
    id_list_feature_offsets = torch.cumsum(id_list_feature_lengths, dim=0)
    print("Offsets: ", id_list_feature_offsets)
    print("First Batch: ", id_list_feature_values[: id_list_feature_offsets[0]])
    print("Second Batch: ", id_list_feature_values[id_list_feature_offsets[0] : id_list_feature_offsets[1]])

    jt = JaggedTensor(values=id_list_feature_values, lengths=id_list_feature_lengths)
    print("Offsets: ", jt.offsets())
    print("List of values: ", jt.to_dense())
    print(jt)

    product_jt = JaggedTensor(values=torch.tensor([1, 2, 3, 1, 5, 7, 9]), lengths=torch.tensor([3, 4]))
    user_jt = JaggedTensor(values=torch.tensor([2, 3, 4, 1]), lengths=torch.tensor([2, 2]))
    kjt = KeyedJaggedTensor.from_jt_dict({"product": product_jt, "user": user_jt})
    print("Keys: ", kjt.keys())
    print("Lengths: ", kjt.lengths())
    print("Values: ", kjt.values())
    print("to_dict: ", kjt.to_dict())
    print(kjt)

    result = ebc(kjt)
    print(result)
    print(result.keys())
    print(result.values().shape)
    result_dict = result.to_dict()
    for key, embedding in result_dict.items():
        print(key, embedding.shape)
    return {"recap": recap, "jt": jt, "kjt": kjt, "result": result, "ebc": ebc}


if __name__ == "__main__":
    main()
