"""Screening of sites' trained weights before aggregation: one malformed or extreme update (a bug, a
corrupted transfer, a poisoned site) must not reach a global model that took days to train."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord

# An update longer than this many times the median of the other sites' is scaled down to it (`clip_bounds`).
CLIP_RATIO = 3.0


def malformed(arrays: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why these arrays cannot be averaged into the global model, or None if they can."""
    names, expected = set(arrays.keys()), set(global_arrays)
    if names != expected:
        return (f"array names differ from the global model: missing {sorted(expected - names)[:3]}, "
                f"unexpected {sorted(names - expected)[:3]}")
    non_finite = []
    for name, array in arrays.items():
        reference = global_arrays[name]
        if tuple(array.shape) != reference.shape:
            return f"array {name} has shape {tuple(array.shape)}, the model's is {reference.shape}"
        if np.dtype(array.dtype) != reference.dtype:
            return f"array {name} has dtype {array.dtype}, the model's is {reference.dtype}"
        try:
            values = array.numpy()
        except Exception as err:  # a buffer that does not decode is as bad as a wrong shape
            return f"array {name} does not decode: {err}"
        if not np.isfinite(values).all():
            non_finite.append(name)
    if non_finite:
        return f"NaN or Inf in {len(non_finite)} arrays (first: {non_finite[0]})"
    return None


def median_of_others(values: Mapping[str, float]) -> dict[str, float]:
    """Per site, the median of the *other* sites' values (a site cannot move its own yardstick);
    only sites that have others."""
    return {site: float(np.median([v for s, v in values.items() if s != site])) for site in values if len(values) > 1}


def clip_bounds(norms: Mapping[str, float], ratio: float = CLIP_RATIO) -> dict[str, float]:
    """The norm each too-long update is scaled down to: `ratio` × the median of the other sites'
    update norms. Sites not named keep their update as sent."""
    return {site: ratio * median for site, median in median_of_others(norms).items() if norms[site] > ratio * median}


def update_norm(arrays: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the site's change to the global model, over all arrays."""
    return float(np.sqrt(sum(float(np.sum((a.numpy().astype(np.float64) - global_arrays[k]) ** 2)) for k, a in arrays.items())))


@dataclass
class Screening:
    """What `screen_updates` found: the reason each rejected site's update is left out (sites not named
    pass), and the update norm of every well-formed update, computed once for the screening and for
    whatever later needs it (the strategy's clipping and its record)."""

    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)


def screen_updates(updates: Mapping[str, ArrayRecord], global_arrays: Mapping[str, np.ndarray],
                   max_norm_ratio: float) -> Screening:
    """Each update checked as `malformed` and, if well formed, by its norm.

    A norm is compared with the median of the *other* sites' norms, so with two sites the extreme
    one is caught, not both. `max_norm_ratio <= 0` turns the norm check off."""
    screening = Screening()
    rejected, norms = screening.rejected, screening.norms
    for site, arrays in updates.items():
        reason = malformed(arrays, global_arrays)
        if reason:
            rejected[site] = reason
        else:
            norms[site] = update_norm(arrays, global_arrays)
    if max_norm_ratio > 0:
        for site, others in median_of_others(norms).items():
            norm = norms[site]
            if norm > max_norm_ratio * max(others, 1e-12):
                rejected[site] = (f"update norm {norm:.3g} is {norm / max(others, 1e-12):.0f}x the median of the other "
                                  f"sites' ({others:.3g}); the limit is {max_norm_ratio:g}x")
    return screening
