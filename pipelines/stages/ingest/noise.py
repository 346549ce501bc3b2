"""Ingest's held-out splits and injected noise (seeded, reproducible): on the driver from the listing for the small
sources, and per uid partition in the tasks of an index in place (:func:`swap_captions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np

from pipelines.run.config import MAX_SEED, SpecError, doc, require
from pipelines.run.errors import InputError
from pipelines.stages.ingest.sources import Listing, template


@dataclass(frozen=True)
class NoiseConfig:
    kind: Literal["label", "caption"] = doc("label: relabel to another class; caption: swap captions")
    rate: float = doc("fraction of training samples to corrupt")
    seed: int = doc("random seed", default=0)

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise SpecError(f"rate: expected a fraction in [0, 1], got {self.rate}")
        require(self, "seed", 0, high=MAX_SEED)


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = doc("fraction of samples held out as split='test' (never corrupted)")
    reference_fraction: float = doc("fraction set aside as split='reference': clean data, disjoint from the "
                                    "training pool and the test split, to train a reference on", default=0.0)
    seed: int = doc("random seed", default=0)

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise SpecError(f"test_fraction: expected a fraction in [0, 1), got {self.test_fraction}")
        if not 0.0 <= self.reference_fraction < 1.0 - self.test_fraction:
            raise SpecError(f"reference_fraction: expected a fraction in [0, 1 - test_fraction), got "
                            f"{self.reference_fraction}")
        require(self, "seed", 0, high=MAX_SEED)


def assign_split(n: int, split: Optional[SplitConfig], part: Optional[int] = None) -> np.ndarray:
    """The split of ``n`` samples (of the whole listing, or with ``part`` of one uid partition of an index:
    seeded by the spec's seed and the partition, so a rerun gives the same)."""
    out = np.array(["train"] * n, dtype=object)
    if split is not None and n:
        order = np.random.default_rng(split.seed if part is None else [split.seed, part]).permutation(n)
        n_test = int(round(split.test_fraction * n))
        n_ref = int(round(split.reference_fraction * n))
        out[order[:n_test]] = "test"
        out[order[n_test:n_test + n_ref]] = "reference"
    return out


def inject_noise(listing: Listing, eligible: np.ndarray, noise: NoiseConfig, templates: Tuple[str, ...]) -> np.ndarray:
    """Corrupt ``rate`` of the eligible samples in place; returns the ``corrupted`` flags (the truth)."""
    n = len(listing)
    if noise.kind == "label" and len(listing.class_names) < 2:
        raise InputError(f"label noise needs at least 2 classes, the source has {len(listing.class_names)}")
    corrupted = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(eligible)
    k = int(round(noise.rate * len(candidates)))
    if k == 0:
        return corrupted
    rng = np.random.default_rng(noise.seed)
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    if noise.kind == "label":
        num_classes = len(listing.class_names)
        for i in chosen:
            old = listing.extras["label"][i]
            new = (old + int(rng.integers(1, num_classes))) % num_classes  # uniformly one of the other classes
            listing.extras["label"][i] = new
            listing.texts[i] = template(templates, listing.uids[i], listing.class_names[new])
            corrupted[i] = True
    else:
        if k < 2:
            return corrupted
        originals = [listing.texts[i] for i in chosen]
        for j, i in enumerate(chosen):  # a rotation: every chosen sample gets another's caption
            listing.texts[i] = originals[(j + 1) % k]
            corrupted[i] = listing.texts[i] != originals[j]
    return corrupted


def swap_captions(texts: np.ndarray, tars: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                  eligible: np.ndarray, noise: NoiseConfig, part: int) -> np.ndarray:
    """Caption noise on one uid partition of an index, in place and without touching a tar: ``rate`` of the
    eligible rows (seeded by the spec's seed and ``part``) take each other's caption pointers in a rotation
    (``text``, and ``text_offset`` / ``text_size`` where the caption comes from the same tar, else ``-1``: the
    ``text`` column holds it).  Returns the ``corrupted`` flags."""
    corrupted = np.zeros(len(texts), dtype=bool)
    candidates = np.flatnonzero(eligible)
    k = int(round(noise.rate * len(candidates)))
    if k < 2:
        return corrupted
    chosen = np.sort(np.random.default_rng([noise.seed, part]).choice(candidates, size=k, replace=False))
    donors = np.roll(chosen, -1)  # a rotation: every chosen row gets the next one's caption
    same = tars[chosen] == tars[donors]
    new_texts = texts[donors]
    offsets[chosen] = np.where(same, offsets[donors], -1)
    sizes[chosen] = np.where(same, sizes[donors], -1)
    corrupted[chosen] = new_texts != texts[chosen]
    texts[chosen] = new_texts
    return corrupted


def flip_labels(labels: np.ndarray, texts: np.ndarray, uids: np.ndarray, eligible: np.ndarray, noise: NoiseConfig,
                part: int, names, templates) -> np.ndarray:
    """Label noise on one uid partition of an index of a labelled folder, in place: ``rate`` of the eligible rows
    (seeded by the spec's seed and ``part``) take one of the other classes, uniformly, and a caption of it from
    the templates.  Returns the ``corrupted`` flags."""
    corrupted = np.zeros(len(labels), dtype=bool)
    candidates = np.flatnonzero(eligible)
    k = int(round(noise.rate * len(candidates)))
    if k == 0:
        return corrupted
    rng = np.random.default_rng([noise.seed, part])
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    labels[chosen] = (labels[chosen] + rng.integers(1, len(names), size=k)) % len(names)
    for i in chosen:
        texts[i] = template(templates, uids[i], names[labels[i]])
    corrupted[chosen] = True
    return corrupted
