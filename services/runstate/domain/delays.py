"""Delay arithmetic of R4, R6 and R7, driven by an explicit uniform draw instead of `random`."""

from __future__ import annotations

import math
from datetime import timedelta

R4_CLAMPING_FACTOR = 0.3


def lower_clamp_multiple(upper_multiple: float) -> float:
    """c = log2(2^k / (2^k - 1)) for k = the upper multiple (1.3 -> 0.7518)."""
    if upper_multiple >= 50:  # Prefect's cut-off, kept for equal answers (c < 1e-15 from here on)
        return 0.0
    power = 2.0**upper_multiple
    return math.log2(max(power / (power - 1.0), 1e-10))


def clamped_exponential(mean: float, clamping_factor: float, uniform: float) -> float:
    """A draw from an exponential distribution with `mean`, truncated to
    [mean*c, mean*(1+clamping_factor)], by inverting the CDF at `uniform` in [0, 1)."""
    if mean <= 0:
        # The exponential is undefined here (Prefect would divide by zero); no wait is the
        # only meaningful answer and keeps the core total.
        return 0.0
    upper_multiple = 1.0 + clamping_factor
    lower_bound = max(0.0, mean * lower_clamp_multiple(upper_multiple))
    upper_bound = mean * upper_multiple
    lower_p = 1.0 - math.exp(-lower_bound / mean)
    upper_p = 1.0 - math.exp(-upper_bound / mean)
    p = lower_p + uniform * (upper_p - lower_p)
    return -math.log(max(1.0 - p, 1e-10)) * mean


def whole_seconds_until(delta: timedelta) -> int:
    """Whole seconds of `delta` the way R6 counts them: the floored seconds plus the
    fraction rounded half-to-even, so an exact .5 rounds down (0.5 -> 0, 30.6 -> 31)."""
    whole = delta.days * 86400 + delta.seconds
    return whole + round(delta.microseconds / 1_000_000)
