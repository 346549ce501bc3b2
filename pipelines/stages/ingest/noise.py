"""Ingest's held-out splits and injected noise, decided on the driver from the listing (seeded, reproducible)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np

from pipelines.run.config import SpecError, doc
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


def assign_split(n: int, split: Optional[SplitConfig]) -> np.ndarray:
    out = np.array(["train"] * n, dtype=object)
    if split is not None and n:
        order = np.random.default_rng(split.seed).permutation(n)
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
