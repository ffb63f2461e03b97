"""Synthetic abdominal CT-like patients: body outline, fat, spine, an organ and optional lesions.

Anatomy is drawn in millimetres, so a site's pixel spacing, slice thickness and field of view change
what the images look like, as they would between scanners. Returns true HU and the label volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORGAN, LESION = 1, 2
HU = {"air": -1000.0, "fat": -90.0, "soft": 40.0, "organ": 105.0, "lesion": 165.0, "bone": 650.0}


@dataclass(frozen=True)
class Anatomy:
    body: tuple[float, float]  # semi-axes (x, y) mm
    organ_centre: tuple[float, float, float]
    organ_radii: tuple[float, float, float]
    lesions: tuple[tuple[float, float, float, float], ...]  # (x, y, z, radius) mm


def random_anatomy(rng: np.random.Generator, lesion_prevalence: float, lesion_radius_mm: tuple[float, float]) -> Anatomy:
    organ_radii = (rng.uniform(55, 75), rng.uniform(42, 58), rng.uniform(45, 65))
    centre = (rng.uniform(-65, -45), rng.uniform(-15, 5), rng.uniform(-8, 8))
    lesions = []
    if rng.random() < lesion_prevalence:
        for _ in range(rng.integers(1, 4)):
            r = rng.uniform(*lesion_radius_mm)
            offset = [rng.uniform(-0.55, 0.55) * (R - r) for R in organ_radii]
            lesions.append((centre[0] + offset[0], centre[1] + offset[1], centre[2] + offset[2], r))
    return Anatomy((rng.uniform(140, 175), rng.uniform(95, 125)), centre, organ_radii, tuple(lesions))


def render(anatomy: Anatomy, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """HU volume and label volume on a grid centred on the patient; spacing is (slice, row, col) mm."""
    n, rows, cols = shape
    z = (np.arange(n) - (n - 1) / 2) * spacing[0]
    y = (np.arange(rows) - (rows - 1) / 2) * spacing[1]
    x = (np.arange(cols) - (cols - 1) / 2) * spacing[2]
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    a, b = anatomy.body
    body = (X / a) ** 2 + (Y / b) ** 2 <= 1
    inner = (X / (a - 12)) ** 2 + (Y / (b - 12)) ** 2 <= 1
    hu = np.full(shape, HU["air"], dtype=np.float32)
    hu[body] = HU["fat"]
    hu[inner] = HU["soft"]
    spine = (X ** 2 + (Y - (b - 38)) ** 2) <= 14 ** 2
    hu[spine] = HU["bone"]
    cx, cy, cz = anatomy.organ_centre
    rx, ry, rz = anatomy.organ_radii
    organ = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2 <= 1
    labels = np.zeros(shape, dtype=np.uint8)
    hu[organ] = HU["organ"]
    labels[organ] = ORGAN
    for lx, ly, lz, r in anatomy.lesions:
        lesion = organ & (((X - lx) ** 2 + (Y - ly) ** 2 + (Z - lz) ** 2) <= r ** 2)
        hu[lesion] = HU["lesion"]
        labels[lesion] = LESION
    return hu, labels
