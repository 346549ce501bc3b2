"""Brute-force oracle for the per-step binarisers."""

from __future__ import annotations

import numpy as np


def brute_kmeans(values):
    """The optimal 2-means partition by trying every split of the sorted values; returns the centroid midpoint."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    best = (np.inf, None)
    for j in range(1, len(v)):
        a, b = v[:j], v[j:]
        if a[-1] == b[0]:
            continue
        sse = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
        if sse < best[0] - 1e-12:
            best = (sse, (a.mean() + b.mean()) / 2)
    return np.inf if best[1] is None else best[1]
