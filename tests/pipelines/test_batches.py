"""A worker's batches: the stream fetched ahead while the model builds, the held-out chunks decoded once."""

import threading

import pytest

from pipelines.training.batches import Ahead


def test_ahead_yields_everything_in_order_and_fetches_the_first_at_once():
    fetched = threading.Event()

    def items():
        fetched.set()
        yield from range(5)

    ahead = Ahead(items())
    assert fetched.wait(10)  # before anyone iterates
    assert list(ahead) == [0, 1, 2, 3, 4]
    assert list(Ahead(iter(()))) == []


def test_ahead_raises_the_streams_error_where_it_is_consumed():
    def broken():
        raise OSError("s3://bucket/shard-00003.parquet: connection reset")
        yield

    ahead = Ahead(broken())
    with pytest.raises(OSError, match="shard-00003"):
        next(iter(ahead))


class _Shard:
    """A dataset shard's ``iter_batches``: counts its passes and signals when the first one starts."""

    def __init__(self, batches):
        self.items, self.passes, self.started = batches, 0, threading.Event()

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        self.passes += 1
        self.started.set()
        yield from self.items


def test_held_out_chunks_decode_at_once_and_are_kept_when_they_fit():
    import numpy as np

    from pipelines.training.batches import Replayable

    shard = _Shard([{"x": np.arange(4)}, {"x": np.arange(4, 6)}])
    chunks = Replayable(shard)
    assert shard.started.wait(10)  # the first pass starts before anyone asks for it
    for _ in range(3):
        assert [b["x"].tolist() for b in chunks.batches()] == [[0, 1, 2, 3], [4, 5]]
    assert shard.passes == 1


def test_held_out_chunks_over_the_budget_are_read_again_on_every_pass():
    import numpy as np

    from pipelines.training.batches import Replayable

    shard = _Shard([{"x": np.arange(4)}, {"x": np.arange(4, 6)}])
    chunks = Replayable(shard, budget=40)  # the first batch (32 bytes) fits, the second does not
    for _ in range(2):
        assert [b["x"].tolist() for b in chunks.batches()] == [[0, 1, 2, 3], [4, 5]]
    assert shard.passes == 3  # the first pass, given up at the budget, and one per evaluation
