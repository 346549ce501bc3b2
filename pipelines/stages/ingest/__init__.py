"""``ingest``: sources listed on the driver, splits and noise decided there, shards written by Ray tasks."""
