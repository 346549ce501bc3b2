"""Models the train stage builds, offline: open_clip CLIPs by architecture name or model-config JSON, and image
classifiers (an open_clip visual tower, a torchvision model or a :mod:`pipelines.models.backbones` backbone, with a
linear head).

Everything here is built with random weights (``pretrained=None``); weights come from a previous stage, a local file
(:func:`gradmimic.load_state_dict`) or an open_clip pretrained tag fetched once on the driver
(:func:`fetch_pretrained`), and are loaded with :func:`load_weights`, which names any parameter that does not fit.
``tiny-clip`` is a CLIP small enough for a CPU step in well under a second at batch 256, with every part of a real
ViT-B/32 (patch embedding, pre-LN transformer, class token, learned positions, bare-parameter projections); its
config ships as ``model_configs/tiny-clip.json``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pipelines.run.errors import InputError, InputNotFound

CONFIG_DIR = pathlib.Path(__file__).parent / "model_configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _quiet():
    """open_clip logs a warning for every model built without pretrained weights, which is all of ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def open_clip_name(arch: str) -> str:
    """The open_clip model name for ``arch``: a built-in name, a shipped config (``tiny-clip``) or a ``.json`` path."""
    import open_clip

    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise InputNotFound(f"model config not found: {arch}")
        open_clip.add_model_config(arch)
        return pathlib.Path(arch).stem
    if open_clip.get_model_config(arch) is None and (CONFIG_DIR / f"{arch}.json").exists():
        open_clip.add_model_config(CONFIG_DIR / f"{arch}.json")
    if open_clip.get_model_config(arch) is None:
        near = [m for m in open_clip.list_models() if arch.lower()[:4] in m.lower()][:6]
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise InputError(f"unknown open_clip architecture {arch!r} (similar: {', '.join(near) or 'none'}; shipped: "
                       f"{', '.join(shipped)}; or give a model-config .json)")
    return arch


def clip_config(arch: str) -> Dict[str, Any]:
    import open_clip

    return open_clip.get_model_config(open_clip_name(arch))


def build_clip(arch: str, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip CLIP with random weights, the same for the same ``seed``."""
    import open_clip

    name = open_clip_name(arch)
    torch.manual_seed(seed)
    with _quiet():
        return open_clip.create_model(name, pretrained=None, device=device)


def tiny_clip(seed: int = 0) -> nn.Module:
    """The shipped CPU-sized CLIP (``tiny-clip``), random init, deterministic for ``seed``."""
    return build_clip("tiny-clip", seed)


class ImageClassifier(nn.Module):
    """``head(visual(images))``: an image backbone (``visual``) and a linear head over the classes."""

    def __init__(self, visual: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def _strip_last_linear(model: nn.Module) -> int:
    """Replace a torchvision model's final ``nn.Linear`` (its classifier) by the identity; returns its input size."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise InputError(f"{type(model).__name__} has no final nn.Linear to replace with the head")
    owner_name, _, attr = last.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    features = getattr(owner, attr).in_features
    setattr(owner, attr, nn.Identity())
    return features


@dataclass(frozen=True)
class ModelSpec:
    """What to build: everything a worker (or a later stage) needs, as plain data (also saved as ``model.json``)."""

    task: str  # clip | classify
    arch: str = "tiny-clip"  # open_clip architecture / config (clip, and classify without a backbone)
    backbone: Optional[str] = None  # classify: a pipelines.models.backbones name or a torchvision model; clip: the
    # image tower of a tower CLIP (pipelines.models.towers), with text_tower
    num_classes: int = 0
    image_size_override: Optional[int] = None
    text_tower: Optional[str] = None  # clip: a pretrained text tower (pipelines.models.towers.TEXT_TOWERS)
    embed_dim: int = 0  # a tower CLIP's embedding width
    cached: bool = False  # a tower CLIP without its towers, on their cached features (never in model.json: a
    # stage's weights load into the full model, whose towers come from their packages)

    @property
    def towers(self) -> bool:
        """A CLIP of pretrained towers (:mod:`pipelines.models.towers`), not an open_clip architecture."""
        return self.task == "clip" and self.text_tower is not None

    def build(self, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
        if self.towers:
            from pipelines.models.towers import tower_clip

            return tower_clip(self.backbone, self.text_tower, self.embed_dim, seed, device, cached=self.cached)
        if self.task == "clip":
            return build_clip(self.arch, seed, device)
        if self.backbone:
            import torchvision

            torch.manual_seed(seed)
            with torch.device(device):
                if self.packaged is not None:
                    backbone, features = self.packaged.build(), self.packaged.feature_dim
                else:
                    backbone = torchvision.models.get_model(self.backbone, weights=None)
                    features = _strip_last_linear(backbone)
                torch.manual_seed(seed + 1)
                return ImageClassifier(backbone, features, self.num_classes)
        clip = build_clip(self.arch, seed, device)
        with torch.device(device):
            torch.manual_seed(seed + 1)
            return ImageClassifier(clip.visual, clip_config(self.arch)["embed_dim"], self.num_classes)

    def features_of(self, features: Optional[Dict[str, Any]]) -> bool:
        """Whether cached tower features (a dataset manifest's ``features``) are of this tower CLIP's towers at its
        image size."""
        return self.towers and bool(features) and (features["image_tower"], features["text_tower"],
                                                   features["image_size"]) == (self.backbone, self.text_tower,
                                                                               self.image_size)

    @property
    def feature_dims(self) -> Tuple[int, int]:
        """A tower CLIP's tower feature widths (image, text): what a cached one takes."""
        from pipelines.models.towers import feature_dims

        return feature_dims(self.backbone, self.text_tower)

    @property
    def packaged(self):
        """The :mod:`pipelines.models.backbones` entry of this backbone (``None``: torchvision's, or no backbone)."""
        from pipelines.models.backbones import BACKBONES

        return BACKBONES.get(self.backbone) if self.backbone else None

    @property
    def image_size(self) -> int:
        if self.backbone:
            return self.image_size_override or (self.packaged.image_size if self.packaged else 224)
        size = clip_config(self.arch)["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def normalisation(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        if self.packaged is not None:
            return self.packaged.normalisation
        return (IMAGENET_MEAN, IMAGENET_STD) if self.backbone else (OPENAI_MEAN, OPENAI_STD)

    @property
    def context_length(self) -> int:
        if self.towers:
            from pipelines.models.towers import TEXT_TOWERS

            return TEXT_TOWERS[self.text_tower].context_length
        return int(clip_config(self.arch)["text_cfg"].get("context_length", 77))

    @property
    def tokenizer(self) -> str:
        """Whose tokenizer the captions go through: the text tower's, or the open_clip architecture's."""
        return self.text_tower if self.towers else self.arch

    @property
    def default_params(self) -> List[str]:
        """The paper's default mimic parameter: the last projection (CLIP) or the head."""
        return ["visual.proj"] if self.task == "clip" else ["head.weight"]

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"task": self.task, "arch": self.arch, "backbone": self.backbone,
                               "num_classes": self.num_classes, "image_size": self.image_size}
        if self.towers:
            out.update(text_tower=self.text_tower, embed_dim=self.embed_dim)
        if not self.backbone:
            out["open_clip_config"] = clip_config(self.arch)
        mean, std = self.normalisation
        out.update(mean=list(mean), std=list(std))
        return out


def meta_model(spec: ModelSpec) -> nn.Module:
    """The model's structure without memory (names and shapes for checks on the driver)."""
    return spec.build(device="meta")


def shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a checkpoint of ``model`` holds: parameters and persistent buffers (BatchNorm statistics)."""
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def match_names(names: Sequence[str], patterns: Sequence[str]) -> List[str]:
    """Parameter names matching any of the glob ``patterns`` (an exact name is a pattern too)."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def apply_trainable(model: nn.Module, trainable: Optional[Sequence[str]], freeze: Sequence[str]) -> List[str]:
    """Freeze by name; returns the names that still train."""
    names = [n for n, _ in model.named_parameters()]
    keep = set(match_names(names, trainable)) if trainable is not None else set(names)
    keep -= set(match_names(names, freeze))
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return [n for n in names if n in keep]


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that a submodule none of whose parameters train stays in eval mode: a frozen
    backbone's BatchNorm keeps normalising with its pretrained statistics (and never updates them), as linear
    probing needs."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model


def fit_state(model_shapes: Mapping[str, Tuple[int, ...]], state: Mapping[str, torch.Tensor],
              skip: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """The tensors of ``state`` this model takes, by name (a bare backbone's keys gain ``visual.``).

    Raises naming the first parameter whose shape differs, or when nothing of the model is in ``state``.
    """
    if not any(k in model_shapes for k in state) and any(f"visual.{k}" in model_shapes for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}
    out = {}
    for name, shape in model_shapes.items():
        if name in skip or name not in state:
            continue
        if tuple(state[name].shape) != shape:
            raise InputError(f"parameter {name!r} has shape {tuple(state[name].shape)} in the weights but "
                             f"{shape} in this model (another architecture?)")
        out[name] = state[name]
    if not out:
        raise InputError(f"none of this model's parameters are in the weights ({len(state)} tensors, e.g. "
                         f"{', '.join(list(state)[:3])})")
    return out


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy matching tensors (already checked by :func:`fit_state`) into the model, keeping its dtypes."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            target = params.get(name, buffers.get(name))
            if target is not None:
                target.copy_(value.to(target.dtype))


def fetch_pretrained(arch: str, tag: str) -> Dict[str, torch.Tensor]:
    """An open_clip pretrained tag's weights (downloads on first use, so it needs the network)."""
    import open_clip

    name = open_clip_name(arch)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise InputError(f"open_clip has no pretrained tag {tag!r} for {name} (tags: {', '.join(tags) or 'none'})")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    host = _weights_host(cfg)
    if host and not _reachable(host):
        raise ConnectionError(f"pretrained {name}/{tag} must be downloaded from {host}, which is not reachable "
                              "(no network?); download it elsewhere and give its file as a path")
    from gradmimic import load_state_dict

    try:  # open_clip downloads the file; reading it is ours (safetensors or weights-only, never code)
        with _quiet():
            path = open_clip.download_pretrained(cfg, prefer_hf_hub=True)
    except (RuntimeError, OSError) as exc:
        raise ConnectionError(f"could not fetch pretrained {name}/{tag}: {str(exc).splitlines()[0][:300]}") from None
    if not path:
        raise ConnectionError(f"could not fetch pretrained {name}/{tag}: open_clip found no file for it")
    return load_state_dict(path)


def _weights_host(cfg: Mapping[str, Any]) -> Optional[str]:
    from urllib.parse import urlparse

    if cfg.get("hf_hub"):
        return "huggingface.co"
    url = cfg.get("url") or ""
    return urlparse(url).hostname


def _reachable(host: str, timeout: float = 5.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_json(spec: ModelSpec, extra: Optional[Mapping[str, Any]] = None) -> bytes:
    return json.dumps({**spec.describe(), **(extra or {})}, indent=2, sort_keys=True).encode()
