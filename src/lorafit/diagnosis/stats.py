"""Small robust statistics the detectors share.

Training loss is analysed in log space: its noise is multiplicative (a batch of hard examples scales
the loss, it does not add a constant), so log-loss residuals have a stable spread along the run, and
a "2x spike" means the same thing at loss 3.0 and at loss 0.3. Medians and MADs instead of means and
standard deviations keep one spike from hiding itself by inflating the very scale it is judged by.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its standard deviation


# A rolling median costs (records x window) numbers. Up to this many it is exact at every record; beyond
# (a 200,000-record log with windows of 5% of it would be 2 x 10^9) it is computed at evenly spaced
# records, as many as the budget allows, and interpolated between them: a window that wide moves by a
# small share of itself between two computed points, so its median barely changes.
MEDIAN_BUDGET = 20_000_000
_CHUNK = 2_000_000         # numbers copied out of the window view at a time (16 MB)


def _padded_windows(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """Windows x[i-before : i+after+1] for every i, NaN-padded at the ends (a view, no copy)."""
    pad = np.concatenate([np.full(before, np.nan), x, np.full(after, np.nan)])
    return sliding_window_view(pad, before + after + 1)


def _row_medians(w: np.ndarray) -> np.ndarray:
    """Median of the finite values of each row (NaN for a row without any), like np.nanmedian(w, axis=1)
    but vectorised: rows without NaN by partition, the others (the padded ends) by sorting."""
    out = np.full(len(w), np.nan)
    full = np.isfinite(w).all(axis=1)
    if full.any():
        out[full] = np.median(w[full], axis=1)
    part = np.flatnonzero(~full)
    if len(part):
        rows = np.sort(w[part], axis=1)                  # NaN sorts last
        k = np.sum(np.isfinite(rows), axis=1)
        ok = k > 0
        r, k = np.arange(len(part))[ok], k[ok]
        out[part[ok]] = rows[r, (k - 1) // 2] / 2 + rows[r, k // 2] / 2   # halves first: no overflow near 1e308
    return out


def rolling_median(x: np.ndarray, before: int, after: int, min_count: int = 1) -> np.ndarray:
    """Median of x[i-before : i+after+1] (ends use what exists); NaN where fewer than min_count."""
    x = np.asarray(x, float)
    n = len(x)
    if n == 0:
        return x.copy()
    width = before + after + 1
    finite = np.concatenate([[0], np.cumsum(np.isfinite(x))])
    idx = np.arange(n)
    cnt = finite[np.minimum(idx + after + 1, n)] - finite[np.clip(idx - before, 0, n)]
    stride = max(1, math.ceil(n * width / MEDIAN_BUDGET))
    at = np.unique(np.append(np.arange(0, n, stride), n - 1))
    w = _padded_windows(x, before, after)
    rows = max(1, _CHUNK // width)
    med = np.concatenate([_row_medians(w[at[i:i + rows]]) for i in range(0, len(at), rows)])
    if stride > 1:
        ok = np.isfinite(med)
        med = np.interp(idx, at[ok], med[ok]) if ok.any() else np.full(n, np.nan)
    med[(cnt < min_count) | (cnt == 0)] = np.nan
    return med


def left_median(x: np.ndarray, h: int, min_count: int = 3) -> np.ndarray:
    """Median of the h values before each point (not including it): the level it should continue."""
    shifted = np.concatenate([[np.nan], np.asarray(x, float)[:-1]])
    return rolling_median(shifted, h - 1, 0, min_count)


def right_median(x: np.ndarray, h: int, min_count: int = 3) -> np.ndarray:
    """Median of the h values after each point: the level the curve returns to."""
    shifted = np.concatenate([np.asarray(x, float)[1:], [np.nan]])
    return rolling_median(shifted, 0, h - 1, min_count)


def robust_sigma(x: np.ndarray) -> float:
    """MAD-based standard deviation of a sample (NaNs ignored)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))


def diff_sigma(x: np.ndarray) -> float:
    """Noise level of a series from its first differences: robust to slow trends and rare spikes.

    The difference of two independent noisy values has sqrt(2) times their spread, hence the division.
    """
    d = np.diff(np.asarray(x, float))
    return robust_sigma(d) / math.sqrt(2) if len(d) else math.nan


def curvature_sigma(x: np.ndarray) -> float:
    """Noise level from second differences, which cancel any locally linear trend.

    x[i+1] - 2x[i] + x[i-1] of independent noise has variance 6 sigma^2. Used where a steep trend
    (a diverging or fast-falling loss in a short log) would inflate first differences.
    """
    x = np.asarray(x, float)
    if len(x) < 3:
        return diff_sigma(x)
    return robust_sigma(x[2:] - 2 * x[1:-1] + x[:-2]) / math.sqrt(6)


def rolling_diff_sigma(x: np.ndarray, half: int) -> np.ndarray:
    """diff_sigma over a centred window of about 2*half differences around every point.

    Noise is not constant along a run (it often grows relative to the loss as the loss gets small), so
    spikes are judged against the local noise, not the global one.
    """
    x = np.asarray(x, float)
    if len(x) < 3:
        return np.full(len(x), diff_sigma(x))
    d = np.concatenate([[np.nan], np.diff(x)])
    med = rolling_median(d, half, half, 3)
    mad = rolling_median(np.abs(d - med), half, half, 3)
    return MAD_TO_SIGMA * mad / math.sqrt(2)


def ols_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error (inf when it cannot be estimated)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    if n < 2 or not (np.all(np.isfinite(x)) and np.ptp(x) > 0):
        return 0.0, math.inf
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if not 0 < sxx < math.inf:   # x spread too small or too large for float64 (steps near 1e300)
        return 0.0, math.inf
    b = float(xc @ (y - y.mean())) / sxx
    if n < 3:
        return b, math.inf
    resid = y - y.mean() - b * xc
    return b, math.sqrt(float(resid @ resid) / (n - 2) / sxx)


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, max(dof, 1)))


def mann_kendall(y: np.ndarray) -> tuple[float, float]:
    """Mann-Kendall trend test: (S, z). z < -1.64 means a falling trend at one-sided 5%.

    Rank-based, so a single outlying evaluation cannot create or hide a trend.
    """
    y = np.asarray(y, float)
    n = len(y)
    if n < 3:
        return 0.0, 0.0
    s = float(sum(np.sign(y[j] - y[i]) for i in range(n - 1) for j in range(i + 1, n)))
    var = n * (n - 1) * (2 * n + 5) / 18.0
    z = (s - np.sign(s)) / math.sqrt(var) if s != 0 else 0.0
    return s, float(z)


def ema(x: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard smooths curves)."""
    out = np.empty(len(x))
    m, wsum = 0.0, 0.0
    for i, v in enumerate(np.asarray(x, float)):
        m = (1 - alpha) * m + alpha * v
        wsum = (1 - alpha) * wsum + alpha
        out[i] = m / wsum
    return out


def odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1
