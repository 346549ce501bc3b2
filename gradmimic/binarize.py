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
  enter the M-step (binned EM); initialised from the k-means split, each step iterating until its parameters
  move by less than ``tol`` (relative) or for at most ``GMM_ITERS`` EM steps.

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


def gmm_fit(count_TM: np.ndarray, sum_TM: np.ndarray, sumsq_TM: np.ndarray, iters: int = GMM_ITERS,
            tol: float = 1e-4) -> np.ndarray:
    """Per step, a two-component 1-D Gaussian mixture by binned EM: ``[T, 6]`` = ``pi, mu, var`` of the low then the
    high component (``pi_high = 0`` where there is no split).  A step stops iterating once its parameters move by
    less than ``tol`` (relative), or after ``iters`` EM steps."""
    km = kmeans_split(count_TM, sum_TM, sumsq_TM)
    found = np.isfinite(km[:, 0])
    c, s, q = (np.asarray(a, dtype=np.float64) for a in (count_TM, sum_TM, sumsq_TM))
    x = s / np.maximum(c, 1e-300)  # each bin's mean
    total, s_all, q_all = c.sum(1), s.sum(1), q.sum(1)
    mean = s_all / np.maximum(total, 1)
    floor = 1e-6 * np.maximum(q_all / np.maximum(total, 1) - mean**2, 0.0) + 1e-12  # no collapse onto one value
    thr = np.where(found, km[:, 0], np.inf)
    params = np.zeros((len(c), 6))
    act = np.arange(len(c))
    r_hi = np.where(x > thr[:, None], 1.0, 0.0)  # initial responsibilities: the k-means split
    for it in range(iters + 1):
        ca, sa, qa = c[act], s[act], q[act]
        n_hi, s_hi, q_hi = (r_hi * ca).sum(1), (r_hi * sa).sum(1), (r_hi * qa).sum(1)
        n_lo, s_lo, q_lo = total[act] - n_hi, s_all[act] - s_hi, q_all[act] - q_hi
        mu_lo, mu_hi = s_lo / np.maximum(n_lo, 1e-300), s_hi / np.maximum(n_hi, 1e-300)
        var_lo = np.maximum(q_lo / np.maximum(n_lo, 1e-300) - mu_lo**2, floor[act])
        var_hi = np.maximum(q_hi / np.maximum(n_hi, 1e-300) - mu_hi**2, floor[act])
        tot = np.maximum(total[act], 1)
        new = np.stack([n_lo / tot, mu_lo, var_lo, n_hi / tot, mu_hi, var_hi], axis=1)
        old = params[act]
        params[act] = new
        if it == iters:
            break
        scale = np.abs(new) + 1e-12
        moving = np.max(np.abs(new - old) / scale, axis=1) > tol if it else np.ones(len(act), bool)
        act, r_hi, new = act[moving], r_hi[moving], new[moving]
        if not len(act):
            break
        xa = x[act]
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.log(new[:, 0])[:, None] + _log_normal(xa, new[:, 1:2], new[:, 2:3])
            hi = np.log(new[:, 3])[:, None] + _log_normal(xa, new[:, 4:5], new[:, 5:6])
            diff = np.nan_to_num(lo - hi, nan=0.0)  # nan: a step without rows
        r_hi = 1.0 / (1.0 + np.exp(np.clip(diff, -700, 700)))
    swap = params[:, 1] > params[:, 4]  # the "high" component is the one with the larger mean
    params[swap] = params[swap][:, [3, 4, 5, 0, 1, 2]]
    params[~found] = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    return params


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
