"""Small robust statistics the detectors share.

Training loss is analysed in log space: its noise is multiplicative (a batch of hard examples scales
the loss, it does not add a constant), so log-loss residuals have a stable spread along the run, and
a "2x spike" means the same thing at loss 3.0 and at loss 0.3. Medians and MADs instead of means and
standard deviations keep one spike from hiding itself by inflating the very scale it is judged by.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its standard deviation


def _padded_windows(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """Windows x[i-before : i+after+1] for every i, NaN-padded at the ends."""
    pad = np.concatenate([np.full(before, np.nan), x, np.full(after, np.nan)])
    return sliding_window_view(pad, before + after + 1)


def rolling_median(x: np.ndarray, before: int, after: int, min_count: int = 1) -> np.ndarray:
    """Median of x[i-before : i+after+1] (ends use what exists); NaN where fewer than min_count."""
    if len(x) == 0:
        return x.copy()
    w = _padded_windows(np.asarray(x, float), before, after)
    cnt = np.sum(np.isfinite(w), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN windows at the ends: handled below
        med = np.nanmedian(w, axis=1)
    med[cnt < min_count] = np.nan
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
    if n < 2 or np.ptp(x) == 0:
        return 0.0, math.inf
    xc = x - x.mean()
    sxx = float(xc @ xc)
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
