"""The largest global batch whose compiled step fits a chip, with few compiles.

A step's memory per device is close to affine in the batch (weights and optimizer state fixed, activations and
temporaries per example), so two compiled points predict where it crosses the chip's HBM; the prediction and its
neighbour are then compiled to confirm, and bisection takes over where the line was wrong. Each probe is a full
compile (minutes at the released scale), hence the budget.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Probe:
    batch: int
    total_bytes: float
    fits: bool


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """`largest`: the largest batch seen to fit (0: not even one granule), `smallest_failing` the smallest seen not
    to (None: none failed within the budget, so `largest` is only a lower bound); `probes` in order."""

    largest: int
    smallest_failing: int | None
    probes: tuple[Probe, ...]

    @property
    def exact(self) -> bool:
        """True when the answer is bracketed to one granule."""
        return self.smallest_failing is not None and (self.largest == 0 or self.smallest_failing > self.largest)


def largest_fitting_batch(measure: Callable[[int], float], capacity: float, *, start: int, granule: int,
                          max_probes: int = 6) -> SearchResult:
    """Search multiples of `granule` for the largest batch with `measure(batch) <= capacity` (bytes per device),
    starting from `start`; at most `max_probes` calls of `measure`."""
    if granule <= 0 or start <= 0:
        raise ValueError(f"granule and start must be positive, got {granule}, {start}")
    probes: dict[int, Probe] = {}

    def probe(batch: int) -> Probe:
        if batch not in probes:
            total = measure(batch)
            probes[batch] = Probe(batch, total, total <= capacity)
        return probes[batch]

    def bracket() -> tuple[int, int | None]:
        fitting = [p.batch for p in probes.values() if p.fits]
        failing = [p.batch for p in probes.values() if not p.fits]
        return max(fitting, default=0), min(failing, default=None)

    def round_down(batch: float) -> int:
        return max(granule, int(batch // granule) * granule)

    batch = round_down(start)
    while len(probes) < max_probes:
        low, high = bracket()
        if high is not None and high - low <= granule:
            break
        batch = _next_batch(probes, low, high, capacity, batch, granule, round_down)
        if batch in probes or batch <= 0:
            break
        probe(batch)
    low, high = bracket()
    return SearchResult(low, high, tuple(probes.values()))


def _next_batch(probes, low, high, capacity, batch, granule, round_down) -> int:
    if not probes:
        return batch
    if low == 0:  # nothing fits yet: halve towards one granule
        return round_down(high / 2) if high > granule else 0
    line = _line([p for p in probes.values()])
    if line is not None:
        intercept, slope = line
        predicted = round_down((capacity - intercept) / slope) if slope > 0 else 2 * low
        candidates = [predicted, predicted + granule]
        for candidate in candidates:
            if low < candidate and (high is None or candidate < high) and candidate not in probes:
                return candidate
    if high is None:
        return 2 * low
    return round_down((low + high) / 2) if round_down((low + high) / 2) > low else low + granule


def _line(points: list[Probe]) -> tuple[float, float] | None:
    """(intercept, slope) through the two probes nearest the capacity, or None with fewer than two."""
    if len(points) < 2:
        return None
    a, b = sorted(points, key=lambda p: p.batch)[-2:] if all(p.fits for p in points) else _nearest_pair(points)
    if a.batch == b.batch:
        return None
    slope = (b.total_bytes - a.total_bytes) / (b.batch - a.batch)
    return a.total_bytes - slope * a.batch, slope


def _nearest_pair(points: list[Probe]) -> tuple[Probe, Probe]:
    fitting = max((p for p in points if p.fits), key=lambda p: p.batch)
    failing = min((p for p in points if not p.fits), key=lambda p: p.batch)
    return fitting, failing
