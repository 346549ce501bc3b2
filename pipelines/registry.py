"""The stage registry: ``stage:`` names in a spec -> typed config, implementation, and what the stage produces.

A stage is registered when its implementation exists; later issues add train, aggregate, filter and evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from .stages.ingest import IngestConfig, run_ingest


@dataclass(frozen=True)
class StageDef:
    config: type
    run: Callable[[Any, Any], Dict[str, Any]]
    description: str
    produces: str  # what later stages may reference it as: dataset | model | scores | utility


STAGES: Dict[str, StageDef] = {
    "ingest": StageDef(
        IngestConfig, run_ingest,
        "turn a source (image folder, DataComp pool, labelled set, embedded digits) into sample shards",
        "dataset",
    ),
}
