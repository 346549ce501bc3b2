"""Stage manifests (``_MANIFEST.json``), typed per kind of output: what a stage reports and later stages read.

Every manifest holds ``rows_in``, ``rows_out`` and ``files`` (paths relative to the stage directory), and the
runner's keys (``stage``, ``name``, ``config_hash``, ``config``, ``inputs``, ``version``, ``timings``,
``attempt``; absent from what a stage returns, added when it commits).  Each kind adds its own figures:

- :class:`DatasetManifest` (``ingest``: :class:`IngestManifest`, ``filter``: :class:`FilterManifest`);
- :class:`ModelManifest` (``train``);
- :class:`UtilityManifest` (``aggregate``, a reduced score log);
- :class:`EvaluationManifest` (``evaluate``).

``to_json`` gives the dict that is written (``from_json(d).to_json() == d`` for a manifest a stage wrote): keys
this module does not know are kept in ``extra`` and written back; the runner's keys, and the few a stage writes
only sometimes (:attr:`Manifest.OPTIONAL`), are left out while ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

M = TypeVar("M", bound="Manifest")

RUNNER_KEYS = ("stage", "name", "config_hash", "config", "inputs", "version", "timings", "attempt")


@dataclass
class Manifest:
    OPTIONAL: ClassVar[Tuple[str, ...]] = RUNNER_KEYS  # written only when not None

    rows_in: int = 0
    rows_out: int = 0
    files: List[str] = field(default_factory=list)
    stage: Optional[str] = None
    name: Optional[str] = None
    config_hash: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    inputs: Optional[Dict[str, str]] = None
    version: Optional[str] = None
    timings: Optional[Dict[str, Any]] = None
    attempt: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # keys of other kinds or other versions, kept as they are

    @classmethod
    def from_json(cls: Type[M], data: Dict[str, Any]) -> M:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None or k not in self.OPTIONAL}
        return {**out, **self.extra}

    @classmethod
    def read(cls: Type[M], stage) -> M:
        """A committed stage's manifest (``stage``: a :class:`~pipelines.run.storage.StageDir`)."""
        data = stage.manifest()
        if data is None:
            raise FileNotFoundError(f"{stage.url}: stage is not committed")
        return cls.from_json(data)

    @property
    def config_dict(self) -> Dict[str, Any]:
        return self.config or {}


@dataclass
class DatasetManifest(Manifest):
    """Sample shards (:mod:`pipelines.formats.pool`) and the pool's classes and caption templates."""

    rejected: int = 0
    shards: int = 0
    class_names: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    features: Optional[Dict[str, Any]] = None  # its rows' cached tower features (a features stage): the towers,
    # image size and widths (pipelines.stages.features.TOWER_KEYS)

    def caption_templates(self) -> Optional[List[str]]:
        """The templates; a manifest written before they were recorded has them in its source's config."""
        return self.templates or ((self.config_dict.get("source") or {}).get("templates"))


@dataclass
class IngestManifest(DatasetManifest):
    corrupted: int = 0
    test: int = 0
    reference: int = 0


@dataclass
class FilterManifest(DatasetManifest):
    conserved: bool = True
    kept_in_scope: int = 0
    in_scope: int = 0
    passed_through: int = 0
    kept_fraction: float = 0.0
    reasons: Dict[str, int] = field(default_factory=dict)
    unscored: Dict[str, Any] = field(default_factory=dict)
    clauses: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    rule: str = ""


@dataclass
class ModelManifest(Manifest):
    """A train stage's final weights, metrics and score log (:mod:`pipelines.formats.model`)."""

    rejected: int = 0
    steps: int = 0
    samples_seen: int = 0
    score_rows: Optional[int] = None  # None: no score log
    samples_per_s: float = 0.0
    train_rows: int = 0
    test_rows: int = 0
    workers: int = 0
    resumed_from_step: int = 0
    final: Dict[str, float] = field(default_factory=dict)
    mode: Optional[str] = None
    task: Optional[str] = None
    nonfinite_steps: int = 0
    class_names: Optional[List[str]] = None
    restarts: int = 0
    worker_nodes: int = 0
    # the Ray Train worker group it ran on: a run's train stages with the same resources share one, one after another
    worker_group: str = ""
    skipped: Dict[str, int] = field(default_factory=dict)  # samples skipped as undecodable, by reason
    # seconds from the stage's start to each phase: the driver's (fit, fitted, finished) and rank 0's (process: only
    # where the group started for this stage; loop, model, first_step, last_step, reported: the latest restart's)
    phases: Dict[str, float] = field(default_factory=dict)


@dataclass
class UtilityManifest(Manifest):
    """An aggregate stage's utility (:mod:`pipelines.formats.utility`) and the dataset quality estimate."""

    OPTIONAL: ClassVar[Tuple[str, ...]] = RUNNER_KEYS + ("steps", "epochs")

    log: Optional[str] = None
    log_rows_used: int = 0
    steps: Optional[int] = None  # the log's last step and epoch count, when an option needed them
    epochs: Optional[int] = None
    num_buckets: int = 0
    samples: int = 0
    kept_fraction: Dict[str, float] = field(default_factory=dict)
    quality_estimate: Optional[float] = None
    quality: Dict[str, Any] = field(default_factory=dict)
    mean_score: Optional[float] = None
    fitted_on: Optional[str] = None


@dataclass
class EvaluationManifest(Manifest):
    rejected: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    task: Optional[str] = None
    split: Optional[str] = None


KINDS: Dict[str, Type[Manifest]] = {"dataset": DatasetManifest, "model": ModelManifest, "utility": UtilityManifest,
                                    "evaluation": EvaluationManifest}
BY_STAGE: Dict[str, Type[Manifest]] = {"ingest": IngestManifest, "filter": FilterManifest, "train": ModelManifest,
                                       "aggregate": UtilityManifest, "evaluate": EvaluationManifest}


def from_json(data: Dict[str, Any]) -> Manifest:
    """A committed manifest as the class of the stage that wrote it (its ``stage`` key)."""
    return BY_STAGE.get(data.get("stage"), Manifest).from_json(data)
