"""open_clip model construction, offline: named architectures with ``pretrained=None`` or local weights, and the
tiny configurations that tests and CPU benchmarks use."""

from __future__ import annotations

from typing import Any, Dict

import torch

# A CLIP small enough for a CPU step in well under a second at batch 256, with every part of a real ViT-B/32
# (patch embedding, pre-LN transformer, class token, learned positions, bare-parameter projections).
TINY_CLIP: Dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """An open_clip ``CLIP`` built from :data:`TINY_CLIP` (random init, deterministic for ``seed``)."""
    from open_clip.model import CLIP

    cfg = {**TINY_CLIP, **overrides}
    torch.manual_seed(seed)
    return CLIP(cfg["embed_dim"], dict(cfg["vision_cfg"]), dict(cfg["text_cfg"]))
