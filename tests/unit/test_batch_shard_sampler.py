"""``BatchShardSampler``: the test batches of one process, dealt out whole over ranks, a padding batch for a rank
left without one."""

from __future__ import annotations

from itertools import product

from scoreflow.lit.datamodule import BatchShardSampler


def test_batches_of_one_process_dealt_out_whole_in_turn():
    for n, b, world in product([1, 3, 7, 8, 16], [1, 3, 4, 20], [1, 2, 3]):
        one = [list(range(s, min(s + b, n))) for s in range(0, n, b)]  # DataLoader(range(n), batch_size=b)
        assert list(BatchShardSampler(n, b)) == one
        ranks = [BatchShardSampler(n, b, r, world) for r in range(world)]
        for r, s in enumerate(ranks):
            assert s.padding == (r >= len(one))
            assert list(s) == ([[0]] if s.padding else one[r::world]) and len(s) == len(list(s))
            assert s.indices == [i for batch in one[r::world] for i in batch]  # never the padding image
        assert sorted(i for s in ranks for i in s.indices) == list(range(n))  # each image once


def test_an_empty_split_has_no_batch_anywhere():
    assert [list(BatchShardSampler(0, 4, r, 2)) for r in range(2)] == [[], []]
