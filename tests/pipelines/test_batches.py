"""A worker's batches: the stream fetched ahead while the model builds."""

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
