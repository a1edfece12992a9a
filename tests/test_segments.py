"""repeat_counts against torch.repeat_interleave, the reference, on every route: random seeded
values (int32, int64, float, bool; strided), counts with empty segments, sizes either side of
each route's bound, with and without output_size; and the small CPU inputs never reach
repeat_interleave while torch runs several threads (its parallel region is what stalls under
contention)."""

import pytest
import torch

from jaggedrec.sparse import _segments
from jaggedrec.sparse.jagged_tensor import repeat_counts


def _counts(gen, segments, total):
    """``[segments]`` counts summing to ``total``, about a third of them empty."""
    if segments == 0:
        return torch.zeros(0, dtype=torch.int64)
    cuts = torch.sort(torch.randint(0, total + 1, (segments - 1,), generator=gen)).values
    counts = torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([total]))
    empty = torch.rand(segments, generator=gen) < 0.33
    moved = counts[empty].sum()
    counts[empty] = 0
    if segments and not empty.all():
        counts[(~empty).nonzero()[0, 0]] += moved
    elif total:
        counts[0] = total
    return counts


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("total", [0, 1, 24, _segments._SEARCH_MAX, _segments._SEARCH_MAX + 1, 8000,
                                   _segments._SERIAL_MAX, _segments._SERIAL_MAX + 1])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bool])
def test_matches_repeat_interleave(two_threads, total, dtype):
    gen = torch.Generator().manual_seed(total * 7 + len(str(dtype)))
    for segments in (1, 2, 7, 26):
        counts = _counts(gen, segments, total)
        if dtype == torch.bool:
            values = torch.rand(2 * segments, generator=gen)[::2] < 0.5
        elif dtype.is_floating_point:
            values = torch.randn(2 * segments, generator=gen)[::2]  # strided
        else:
            info = torch.iinfo(dtype)
            values = torch.randint(info.min, info.max, (2 * segments,), generator=gen, dtype=dtype)[::2]
        counts = counts.to(torch.int32) if segments % 2 else counts
        want = torch.repeat_interleave(values, counts.long())
        for size in (None, total):
            got = repeat_counts(values, counts, output_size=size)
            assert got.dtype == want.dtype and torch.equal(got, want), (segments, size)


def test_small_inputs_open_no_parallel_region(two_threads, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave called on a small CPU input")

    values, counts = torch.tensor([0, 1000, 7]), torch.tensor([8, 16, 0])
    want = torch.repeat_interleave(values, counts)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    assert torch.equal(repeat_counts(values, counts, output_size=24), want)
    big = torch.tensor([3, 9]), torch.tensor([600, 700])
    assert torch.equal(repeat_counts(*big), torch.cat([torch.full((600,), 3), torch.full((700,), 9)]))


def test_fake_tensors_take_repeat_interleave(two_threads):
    """An op's fake kernel (which torch 2.11 runs with is_compiling() False) reads no data:
    fake inputs go to repeat_interleave, with or without output_size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        values, counts = torch.arange(3), torch.tensor([2, 0, 3])
        assert repeat_counts(values, counts, output_size=5).shape == (5,)
