"""Per-step binarisers for offline aggregation (Grad-Mimic stage 2, Huang et al. 2025, section 4.2).

Each training step's global batch is split into "keep" and "drop" by one of:

- ``threshold``: the normalised weight is above the uniform one, ``w_i > 1/B`` (decided per row, exact);
- ``kmeans``: 1-D k-means with two clusters on the step's values; keep the cluster with the higher centroid;
- ``gmm``: a two-component 1-D Gaussian mixture; keep the rows whose posterior of the higher-mean component
  exceeds 1/2.

The two fitted binarisers work on **summaries** of a step: its values in bins, each bin holding
``count``, ``sum`` and ``sum of squares`` (mergeable across tasks by addition).  Passing each value as its own
bin (:func:`exact_summary`) gives the exact fit, which is how the approximation is tested:

- k-means: the optimal 2-means partition of sorted 1-D values is a split between two neighbours; here the best
  split *between bins* is found exactly from prefix sums, so the result equals the exact optimum whenever the two
  values around the optimal split fall in different bins (always, for one value per bin).  Rows are assigned to
  the nearer centroid (the optimum is a fixed point of that rule).
- GMM: EM on the bins, each bin's responsibilities taken at its mean while its exact count, sum and sum of squares
  enter the M-step (binned EM); initialised from the k-means split and run for a fixed number of iterations.

A step with fewer than two distinct values has no split: its binarisers keep nobody.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

KEEP_NONE = np.inf
GMM_ITERS = 50


def exact_summary(values_TB: np.ndarray, valid_TB: np.ndarray = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each step's values as one bin each, in sorted order (``valid`` marks the real entries of a padded row)."""
    values = np.asarray(values_TB, dtype=np.float64)
    valid = np.ones(values.shape, bool) if valid_TB is None else np.asarray(valid_TB, bool)
    v = np.where(valid, values, np.inf)
    order = np.argsort(v, axis=1, kind="stable")
    v = np.take_along_axis(v, order, axis=1)
    count = np.isfinite(v).astype(np.float64)
    v = np.where(count > 0, v, 0.0)
    return count, v * count, v * v * count


def kmeans_split(count_TM: np.ndarray, sum_TM: np.ndarray, sumsq_TM: np.ndarray) -> np.ndarray:
    """Per step, the k-means decision boundary (midpoint of the two centroids), ``inf`` where there is no split.

    Bins must be in increasing order of value.  Returns ``[T, 3]``: boundary, low centroid, high centroid."""
    T = len(count_TM)
    if count_TM.shape[1] < 2:
        return np.stack([np.full(T, KEEP_NONE), np.full(T, np.nan), np.full(T, np.nan)], axis=1)
    c = np.cumsum(count_TM, axis=1)[:, :-1]
    s = np.cumsum(sum_TM, axis=1)[:, :-1]
    q = np.cumsum(sumsq_TM, axis=1)[:, :-1]
    n_all, s_all, q_all = count_TM.sum(1, keepdims=True), sum_TM.sum(1, keepdims=True), sumsq_TM.sum(1, keepdims=True)
    cr, sr, qr = n_all - c, s_all - s, q_all - q
    ok = (c > 0) & (cr > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sse = (q - s * s / c) + (qr - sr * sr / cr)
        lo, hi = s / c, sr / cr
    ok &= hi > lo  # a split that separates distinct values
    sse = np.where(ok, sse, np.inf)
    j = np.argmin(sse, axis=1)
    rows = np.arange(T)
    found = ok[rows, j]
    lo_c = np.where(found, lo[rows, j], np.nan)
    hi_c = np.where(found, hi[rows, j], np.nan)
    boundary = np.where(found, (lo_c + hi_c) / 2, KEEP_NONE)
    return np.stack([boundary, lo_c, hi_c], axis=1)


def _log_normal(x, mu, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)


def gmm_fit(count_TM: np.ndarray, sum_TM: np.ndarray, sumsq_TM: np.ndarray, iters: int = GMM_ITERS) -> np.ndarray:
    """Per step, a two-component 1-D Gaussian mixture by binned EM: ``[T, 6]`` = ``pi, mu, var`` of the low then the
    high component (``pi_high = 0`` where there is no split)."""
    km = kmeans_split(count_TM, sum_TM, sumsq_TM)
    found = np.isfinite(km[:, 0])
    n = np.maximum(count_TM, 1e-300)
    x = sum_TM / n  # each bin's mean
    total = count_TM.sum(1)
    mean = sum_TM.sum(1) / np.maximum(total, 1)
    spread = np.maximum(sumsq_TM.sum(1) / np.maximum(total, 1) - mean**2, 0.0)
    floor = (1e-6 * spread + 1e-12)[:, None]  # keeps a component on a single value from collapsing
    thr = np.where(found, km[:, 0], np.inf)[:, None]
    r_hi = np.where(x > thr, 1.0, 0.0)  # initial responsibilities: the k-means split
    params = np.zeros((len(count_TM), 2, 3))
    for it in range(iters + 1):
        r = np.stack([1.0 - r_hi, r_hi], axis=1)  # [T, 2, M]
        nk = (r * count_TM[:, None]).sum(2)
        mu = (r * sum_TM[:, None]).sum(2) / np.maximum(nk, 1e-300)
        var = np.maximum((r * sumsq_TM[:, None]).sum(2) / np.maximum(nk, 1e-300) - mu**2, floor)
        pi = nk / np.maximum(total, 1)[:, None]
        params = np.stack([pi, mu, var], axis=2)
        if it == iters:
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(pi)[:, :, None] + _log_normal(x[:, None], mu[:, :, None], var[:, :, None])
            diff = np.nan_to_num(logp[:, 0] - logp[:, 1], nan=0.0)  # nan: a step without rows
        r_hi = 1.0 / (1.0 + np.exp(np.clip(diff, -700, 700)))
    # the "high" component is the one with the larger mean
    swap = params[:, 0, 1] > params[:, 1, 1]
    params[swap] = params[swap][:, ::-1]
    out = params.reshape(len(params), 6)
    out[~found] = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    return out


def gmm_keep(values: np.ndarray, params_N6: np.ndarray) -> np.ndarray:
    """Rows whose posterior of the high component exceeds 1/2, each row with its step's parameters."""
    p = np.asarray(params_N6, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lo = np.log(p[:, 0]) + _log_normal(x, p[:, 1], p[:, 2])
        hi = np.log(p[:, 3]) + _log_normal(x, p[:, 4], p[:, 5])
    return hi > lo


def binned_summary(step_idx: np.ndarray, values: np.ndarray, lo_T: np.ndarray, hi_T: np.ndarray, bins: int,
                   num_steps: int) -> Dict[str, np.ndarray]:
    """``count``, ``sum``, ``sumsq`` per (step, bin) of ``values`` on each step's ``[lo, hi]`` grid: ``[T, bins]``
    arrays, to be added across tasks."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = lo_T[step_idx], hi_T[step_idx]
    width = np.where(hi > lo, hi - lo, 1.0)
    b = np.clip(((v - lo) / width * bins).astype(np.int64), 0, bins - 1)
    flat = step_idx.astype(np.int64) * bins + b
    size = num_steps * bins
    return {
        "count": np.bincount(flat, minlength=size).astype(np.float64).reshape(num_steps, bins),
        "sum": np.bincount(flat, weights=v, minlength=size).reshape(num_steps, bins),
        "sumsq": np.bincount(flat, weights=v * v, minlength=size).reshape(num_steps, bins),
    }
