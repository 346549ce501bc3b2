"""The embedded default dataset: real images that ship inside an installed package, so everything runs offline.

scikit-learn's ``load_digits`` (the UCI optical-recognition handwritten digits: 1,797 real 8x8 scans, 10 classes)
is read from the wheel itself, no download.  Each digit becomes a labelled sample whose caption comes from its
class name through prompt templates, like any labelled image set.
"""

from __future__ import annotations

import io
from typing import Tuple

import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """``(images (N, 8, 8) in 0..16, labels (N,))`` from the copy inside scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digit_png(image_8x8: np.ndarray) -> bytes:
    """A digit as an RGB PNG of ``IMAGE_SIZE`` pixels (dark ink on white, as scanned)."""
    from PIL import Image

    pixels = (255 - image_8x8 * (255 / 16)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
