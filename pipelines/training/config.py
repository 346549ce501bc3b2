"""The train stage's configuration: the typed spec fields, the table of training modes, and the worker's job.

:data:`MODES` says, per ``mode``, everything the stage and the workers do differently: whether it is scored at all,
which :class:`gradmimic.Weighting` rule weighs the samples (and which one during ``mimic.warmup_steps``), which
reference weights it loads (only the mimic parameters, for a task vector, or the whole model, for reference losses)
and whether it needs a comparison set.  The stage's checks, its driver and the workers ask the table, never a
mode's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Literal, Optional, Tuple, Union, get_args

from pipelines.run.config import MAX_BATCH, MAX_COUNT, MAX_CPUS, MAX_SEED, MAX_WORKERS, SpecError, doc, require

if TYPE_CHECKING:
    from pipelines.models.build import ModelSpec
    from pipelines.training.data import StepPlan


@dataclass(frozen=True)
class Mode:
    """What one training mode needs and how it weighs the samples of a batch."""

    name: str
    rule: Optional[str]  # the gradmimic.Weighting rule; None: plain training (no scores, the plain mean)
    warmup_rule: Optional[str] = None  # the rule for the first mimic.warmup_steps: the same scores, plain weights
    reference: Optional[Literal["params", "model"]] = None  # the reference weights it loads: the mimic parameters
    # (a task vector) or the whole model (reference losses)
    comparison: bool = False  # a comparison set whose mean gradient is the direction

    @property
    def scored(self) -> bool:
        return self.rule is not None

    @property
    def needs_reference(self) -> bool:
        return self.reference is not None

    @property
    def full_reference(self) -> bool:
        return self.reference == "model"


ModeName = Literal["plain", "mimic", "grand", "rho", "agra", "influence"]
MODES: Dict[str, Mode] = {m.name: m for m in (
    Mode("plain", None),
    Mode("mimic", "mimic", warmup_rule="mimic", reference="params"),
    Mode("grand", "grand", warmup_rule="uniform"),
    Mode("rho", "rho", warmup_rule="uniform", reference="model"),
    Mode("agra", "agra", warmup_rule="uniform", comparison=True),
    Mode("influence", "influence", warmup_rule="influence", comparison=True),
)}
if tuple(MODES) != get_args(ModeName):
    raise RuntimeError(f"ModeName {get_args(ModeName)} and the MODES table {tuple(MODES)} disagree")


@dataclass(frozen=True)
class Weights:
    stage: Optional[str] = doc("a previous train stage: its final weights", default=None)
    path: Optional[str] = doc("a .safetensors or weights-only torch file (local path or URL)", default=None)
    pretrained: Optional[str] = doc("an open_clip pretrained tag, e.g. laion2b_s34b_b79k (needs the network), or "
                                     "efficientnet-lite0 (ImageNet weights from an installed package)", default=None)

    def validate(self) -> None:
        given = [k for k in ("stage", "path", "pretrained") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SpecError(f"expected exactly one of stage, path, pretrained, got {', '.join(given) or 'none'}")


WeightsRef = Union[str, Weights]  # a bare string names a previous train stage


@dataclass(frozen=True)
class ModelConfig:
    arch: str = doc("open_clip architecture (e.g. ViT-B-32), the shipped 'tiny-clip', or a model-config .json",
                     default="tiny-clip")
    backbone: Optional[str] = doc("classify: the image backbone instead of the open_clip visual tower: "
                                   "efficientnet_lite0, or a torchvision model (e.g. resnet18); clip, with "
                                   "text_tower: the pretrained image tower (efficientnet_lite0)", default=None)
    image_size: Optional[int] = doc("backbones: input size (open_clip: the architecture's)", default=None)
    text_tower: Optional[str] = doc("clip: a CLIP of pretrained towers instead of an open_clip architecture: the "
                                     "text tower (all-minilm-l6-v2), with backbone the image tower", default=None)
    embed_dim: int = doc("a tower CLIP's embedding width (its projections' outputs)", default=256)

    def validate(self) -> None:
        require(self, "image_size", 1, allow_none=True, high=4096)
        require(self, "embed_dim", 1, high=1 << 16)


@dataclass(frozen=True)
class MimicConfig:
    params: Optional[Tuple[str, ...]] = doc("parameters scored and reweighted (default: visual.proj for clip, "
                                             "head.weight for classify)", default=None)
    method: Literal["proj", "cos", "normed_proj", "normed_cos"] = doc(
        "score: proj | cos of -g_i on T; normed_* reweight with a softmax over the global batch", default="normed_proj")
    temperature: float = doc("softmax temperature (also for grand and rho)", default=1.0)
    reweight: Literal["param", "all"] = doc("reweight the mimic parameters only, or every parameter", default="param")
    warmup_steps: int = doc("first steps with the plain mean's weights (scores still logged)", default=0)

    def validate(self) -> None:
        require(self, "temperature", 0, strict=True, high=1e6)
        require(self, "warmup_steps", 0, high=MAX_COUNT)


@dataclass(frozen=True)
class ComparisonConfig:
    data: str = doc("a dataset stage holding the trusted / comparison samples", ref="dataset")
    split: Literal["train", "test", "reference"] = doc("which of its splits", default="train")
    samples: int = doc("how many (drawn with the seed)", default=256)
    every: int = doc("recompute the direction every this many steps", default=1)
    seed: int = doc("draw seed", default=0)

    def validate(self) -> None:
        require(self, "samples", 1, high=MAX_BATCH)
        require(self, "every", 1, high=MAX_COUNT)
        require(self, "seed", 0, high=MAX_SEED)


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = doc("training workers (DDP ranks)", default=1)
    use_gpu: bool = doc("one GPU per worker (NCCL); otherwise CPU (gloo)", default=False)
    cpus_per_worker: float = doc("CPUs reserved per worker (and its torch threads)", default=1.0)
    decoders_per_worker: int = doc("Ray Data actors decoding each worker's stream (more for large images)", default=1)
    cpus_per_decoder: float = doc("CPUs reserved per decoding actor (and per evaluation decoding task)", default=0.5)

    def validate(self) -> None:
        require(self, "num_workers", 1, high=MAX_WORKERS)
        require(self, "decoders_per_worker", 1, high=64)
        require(self, "cpus_per_worker cpus_per_decoder", 0, strict=True, high=MAX_CPUS)


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = doc("peak learning rate (AdamW)", default=5e-4)
    weight_decay: float = doc("AdamW weight decay (not on gains, biases, logit_scale)", default=0.1)
    betas: Tuple[float, float] = doc("AdamW betas", default=(0.9, 0.98))
    eps: float = doc("AdamW epsilon", default=1e-6)
    warmup_steps: int = doc("linear learning-rate warm-up steps", default=0)
    schedule: Literal["cosine", "constant"] = doc("after warm-up", default="cosine")
    grad_clip: Optional[float] = doc("clip the gradient norm to this (null: off)", default=1.0)

    def validate(self) -> None:
        require(self, "lr", 0, strict=True, high=10.0)
        require(self, "eps", 0, strict=True, high=1.0)
        require(self, "weight_decay", 0, high=10.0)
        require(self, "warmup_steps", 0, high=MAX_COUNT)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and not 0 < self.grad_clip <= 1e9:
            raise SpecError(f"grad_clip: must be > 0 and <= 1e9 (or null to turn it off), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    data: str = doc("the dataset stage to train on (its train split; its test split is held out)",
                     ref="dataset")
    split: Literal["train", "reference"] = doc("the split trained on: train (the pool), or reference (clean data "
                                               "set aside by ingest for a reference model)", default="train")
    task: Literal["clip", "classify"] = doc("clip: symmetric InfoNCE; classify: linear head, cross-entropy",
                                             default="clip")
    mode: ModeName = doc(
        "plain training, Grad-Mimic, or a baseline weighting", default="plain")
    model: ModelConfig = doc("what to build", default=ModelConfig())
    init: Optional[WeightsRef] = doc("initial weights: a train stage, {path: ...} or {pretrained: ...} (default: "
                                      "random, from seed)", default=None, ref="model")
    reinit: Tuple[str, ...] = doc("parameters re-initialised after loading init (e.g. visual.proj)", default=())
    trainable: Optional[Tuple[str, ...]] = doc("train only parameters matching these names / globs", default=None)
    freeze: Tuple[str, ...] = doc("freeze parameters matching these names / globs", default=())
    reference: Optional[WeightsRef] = doc("reference weights for mimic (task vector) and rho (reference losses)",
                                           default=None, ref="model")
    mimic: MimicConfig = doc("scoring and reweighting", default=MimicConfig())
    comparison: Optional[ComparisonConfig] = doc("agra / influence: the comparison set", default=None)
    batch_size: int = doc("global batch (split over the workers)", default=256)
    steps: Optional[int] = doc("training steps (or give epochs)", default=None)
    epochs: Optional[int] = doc("passes over the train split (default 1 when steps is not given)", default=None)
    optimizer: OptimizerConfig = doc("AdamW with warm-up and cosine decay", default=OptimizerConfig())
    precision: Literal["auto", "fp32", "bf16"] = doc("auto: bf16 autocast on GPU, fp32 on CPU", default="auto")
    eval_every: int = doc("evaluate on the test split every this many steps (0: only at the end)", default=0)
    eval_batch_size: int = doc("rows per evaluation chunk (CLIP's held-out loss is over a chunk)", default=256)
    eval_samples: Optional[int] = doc("evaluate on at most this many test rows", default=None)
    checkpoint_every: int = doc("checkpoint (and make the score log durable) every this many steps", default=100)
    max_failures: int = doc("worker-group restarts from the last checkpoint before giving up (-1: unlimited)", default=3)
    max_nonfinite_steps: int = doc(
        "a step whose loss, scores, weights or gradients are not finite (NaN, inf) is skipped: no update and no "
        "score rows, counted in the metrics (nonfinite_steps); this many in a row stop the stage", default=5)
    resources: ResourcesConfig = doc("workers and devices", default=ResourcesConfig())
    num_buckets: int = doc("score-log buckets (bucket = uid_lo % num_buckets): a rank's file keeps each bucket's rows "
                           "in its own row groups", default=64)
    seed: int = doc("model init and data order", default=0)

    def validate(self) -> None:
        mode = MODES[self.mode]
        if mode.needs_reference and self.reference is None:
            raise SpecError(f"reference: mode {self.mode!r} needs a reference model (a previous train stage, "
                            "{path: ...} or {pretrained: ...})")
        if mode.comparison and self.comparison is None:
            raise SpecError(f"comparison: mode {self.mode!r} needs a comparison set ({{data: <dataset stage>, ...}})")
        if self.model.text_tower is not None:
            from pipelines.models.towers import IMAGE_WEIGHTS, TEXT_TOWERS

            if self.task != "clip":
                raise SpecError("model.text_tower: only for task clip")
            if self.model.text_tower not in TEXT_TOWERS:
                raise SpecError(f"model.text_tower: unknown {self.model.text_tower!r} (known: "
                                f"{', '.join(TEXT_TOWERS)})")
            if self.model.backbone not in IMAGE_WEIGHTS:
                raise SpecError(f"model.backbone: a tower CLIP's image tower, one of {', '.join(IMAGE_WEIGHTS)} "
                                f"(got {self.model.backbone!r})")
        elif self.model.backbone and self.task != "classify":
            raise SpecError("model.backbone: for task classify, or the image tower of a clip with model.text_tower")
        if self.model.image_size is not None and not self.model.backbone:
            raise SpecError("model.image_size: only for backbones (open_clip models have their own)")
        require(self, "batch_size eval_batch_size", 1, high=MAX_BATCH)
        require(self, "checkpoint_every", 1, high=MAX_COUNT)
        require(self, "num_buckets", 1, high=1 << 16)
        if self.steps is not None and self.epochs is not None:
            raise SpecError("steps: give steps or epochs, not both")
        require(self, "steps eval_samples", 1, allow_none=True, high=MAX_COUNT)
        require(self, "epochs", 1, allow_none=True, high=1 << 20)
        require(self, "eval_every", 0, high=MAX_COUNT)
        require(self, "max_failures", -1, high=1000)
        require(self, "max_nonfinite_steps", 1, high=MAX_COUNT)
        require(self, "seed", 0, high=MAX_SEED)
        for name in ("init", "reference"):
            w = getattr(self, name)
            if not (isinstance(w, Weights) and w.pretrained and self.model.backbone):
                continue
            from pipelines.models.backbones import PACKAGED_WEIGHTS  # imports torch: only where it is asked

            if w.pretrained not in PACKAGED_WEIGHTS:
                raise SpecError(f"{name}.pretrained: {w.pretrained!r} is not a packaged tag for a backbone "
                                f"({', '.join(PACKAGED_WEIGHTS)}; other weights: give a path)")



def model_spec(cfg: TrainConfig, num_classes: int = 2) -> ModelSpec:
    from pipelines.models.build import ModelSpec

    m = cfg.model
    towers = m.text_tower is not None and cfg.task == "clip"
    return ModelSpec(cfg.task, m.arch, m.backbone, num_classes, m.image_size, m.text_tower if towers else None,
                     m.embed_dim if towers else 0)


def mimic_params(cfg: TrainConfig) -> Tuple[str, ...]:
    return cfg.mimic.params or tuple(model_spec(cfg).default_params)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, as plain data, object refs and stream factories: the stage's config and what the
    driver resolved from it (picklable: its worker group's slot hands it to every worker)."""

    cfg: TrainConfig
    label: str
    model: ModelSpec  # with the pool's classes
    plan: StepPlan
    scores_url: str
    storage_options: Dict[str, Any] = field(default_factory=dict)
    init: Any = None  # object ref of a state dict
    reinit: Tuple[str, ...] = ()  # cfg.reinit's globs, resolved to parameter names
    reference: Any = None  # object ref: the mimic parameters' reference tensors, or the whole reference model (rho)
    params: Tuple[str, ...] = ()  # the mimic parameters
    precision: Literal["fp32", "bf16"] = "fp32"  # cfg.precision with auto resolved
    eval_chunks: int = 0
    zero_shot: Optional[Tuple[Tuple[str, ...], Tuple[str, ...]]] = None  # (class names, templates)
    threads: int = 0
    progress: Optional[str] = None  # name of the ProgressBoard actor
    datasets: Dict[str, Any] = field(default_factory=dict)  # train_<rank>, eval_<rank>, comparison: stream factories

    @property
    def mode(self) -> Mode:
        return MODES[self.cfg.mode]
