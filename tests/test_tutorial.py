"""The TorchRec intro tutorial, run through jaggedrec, shows what the tutorial shows."""

import importlib.util
import pathlib

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torchrec_intro.py"


def _run_example():
    spec = importlib.util.spec_from_file_location("torchrec_intro", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


def test_tutorial_outputs(capsys):
    out = _run_example()
    printed = capsys.readouterr().out
    assert "(product_table): EmbeddingBag(4096, 64, mode='sum')" in printed
    assert "(user_table): EmbeddingBag(4096, 64, mode='sum')" in printed
    assert "JaggedTensor({\n    [[5], [7, 1]]\n})" in printed
    assert 'KeyedJaggedTensor({\n    "product": [[1, 2, 3], [1, 5, 7, 9]],\n    "user": [[2, 3], [4, 1]]\n})' in printed
    assert "def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:" in printed

    jt, kjt, result = out["jt"], out["kjt"], out["result"]
    assert jt.offsets().tolist() == [0, 1, 3]
    assert [t.tolist() for t in jt.to_dense()] == [[5], [7, 1]]
    assert kjt.keys() == ["product", "user"]
    assert kjt.lengths().tolist() == [3, 4, 2, 2]
    assert kjt.values().tolist() == [1, 2, 3, 1, 5, 7, 9, 2, 3, 4, 1]
    assert list(kjt.to_dict()) == ["product", "user"]
    assert result.keys() == ["product", "user"]
    assert result.values().shape == (2, 128)
    assert {k: tuple(v.shape) for k, v in result.to_dict().items()} == {"product": (2, 64), "user": (2, 64)}
    # The tutorial prints [0.1124, 0.5651, 0.5148, 0.4719]; its weights are known only to 4 decimals.
    assert torch.allclose(out["recap"], torch.tensor([[0.1124, 0.5651, 0.5148, 0.4719]]), atol=1e-4)


def test_tutorial_pooled_rows_are_sums_of_table_rows():
    out = _run_example()
    product = out["ebc"].embedding_bags["product_table"].weight.detach()
    user = out["ebc"].embedding_bags["user_table"].weight.detach()
    result = out["result"]
    assert torch.allclose(result["product"][0], product[[1, 2, 3]].sum(0), atol=1e-6)
    assert torch.allclose(result["product"][1], product[[1, 5, 7, 9]].sum(0), atol=1e-6)
    assert torch.allclose(result["user"][1], user[[4, 1]].sum(0), atol=1e-6)
