"""``aggregate``: the score log reduced to one utility row per sample (the stage driver and its Ray tasks)."""

from pipelines.stages.aggregate.stage import AggregateConfig, LogPath, check_aggregate, run_aggregate

__all__ = ["AggregateConfig", "LogPath", "check_aggregate", "run_aggregate"]
