"""Captions to token ids, as the model's text tower reads them: open_clip's tokenizer for an open_clip architecture
(its BPE module loaded alone where that is the tokenizer open_clip would give: the decoders start seconds sooner
without the open_clip package), a text tower's own (:mod:`pipelines.models.towers`)."""

from __future__ import annotations

import functools
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np


def tokenize(arch: Optional[str], context_length: int, texts: Sequence[str]) -> np.ndarray:
    return _tokenizer(arch, context_length)(list(texts)).numpy()


@functools.lru_cache(maxsize=4)
def _tokenizer(arch: Optional[str], context_length: int) -> Callable:
    """``arch``: an open_clip architecture, or a text tower's name (:mod:`pipelines.models.towers`)."""
    from pipelines.models.towers import TEXT_TOWERS, text_tokenizer

    if arch in TEXT_TOWERS:
        return text_tokenizer(arch, context_length)
    fast = bpe_tokenizer(arch, context_length)
    if fast is not None:
        return fast
    import open_clip

    from pipelines.models.build import open_clip_name

    name = open_clip_name(arch) if arch else None
    if name:
        return open_clip.get_tokenizer(name, context_length=context_length)
    return functools.partial(open_clip.tokenize, context_length=context_length)


def bpe_tokenizer(arch: Optional[str], context_length: int) -> Optional[Callable]:
    """open_clip's own BPE tokenizer without importing the open_clip package (4 s of a decoder's start, for its
    model classes, transformers and torchvision): its ``tokenizer`` module loaded alone, where ``get_tokenizer``
    would return that tokenizer (an architecture whose config names no Hugging Face tokenizer, not a SigLIP).
    ``None``: ask open_clip (a config it alone knows, or a module that no longer loads alone)."""
    import importlib.util
    import json
    import sys

    from pipelines.models.build import CONFIG_DIR

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = pathlib.Path(spec.submodule_search_locations[0])
    if arch is not None:
        found = [p for p in (CONFIG_DIR / f"{arch}.json", package / "model_configs" / f"{arch}.json") if p.is_file()]
        if not found or "siglip" in arch.lower():
            return None
        text_cfg = json.loads(found[0].read_text()).get("text_cfg", {})
        if "hf_tokenizer_name" in text_cfg:
            return None
    module = sys.modules.get("open_clip.tokenizer") or sys.modules.get("_gradmimic_bpe")
    if module is None:
        loader = importlib.util.spec_from_file_location("_gradmimic_bpe", package / "tokenizer.py")
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except ImportError:  # it needs its package now: the slow way
            return None
        sys.modules["_gradmimic_bpe"] = module
    kwargs = text_cfg.get("tokenizer_kwargs", {}) if arch is not None else {}
    return module.SimpleTokenizer(context_length=context_length, **kwargs)
