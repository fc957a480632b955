"""Frontal QRS axis from the limb leads' net QRS areas on the hexaxial reference system.

Why a least-squares fit over all six limb leads rather than I and aVF alone: a page may not print one of them
(or the digitiser may lose it); each limb lead is the projection of the same frontal vector on its own angle,
so any two non-parallel leads give the axis and more leads average the read noise out.
"""
from __future__ import annotations

import numpy as np

HEXAXIAL_DEG = {"I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVL": -30.0, "aVF": 90.0}


def frontal_axis(areas: dict[str, float]) -> tuple[float | None, float]:
    """Lead -> net QRS area (mV*s) -> (axis in degrees in (-180, 180], confidence 0-1); None with < 2 leads."""
    names = [ld for ld in HEXAXIAL_DEG if ld in areas and np.isfinite(areas[ld])]
    if len(names) < 2:
        return None, 0.0
    ang = np.radians([HEXAXIAL_DEG[ld] for ld in names])
    if np.ptp(np.mod(ang, np.pi)) < 1e-6:  # all leads on one line: the perpendicular part is unknown
        return None, 0.0
    a = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    y = np.asarray([areas[ld] for ld in names])
    v, *_ = np.linalg.lstsq(a, y, rcond=None)
    norm = float(np.hypot(*v))
    if norm == 0.0:
        return None, 0.0
    deg = float(np.degrees(np.arctan2(v[1], v[0])))
    resid = float(np.sqrt(np.mean((a @ v - y) ** 2)))
    # a vector well above the misfit points clearly; a nearly isoelectric frontal QRS (an indeterminate axis) does not
    confidence = float(np.clip(1.0 - resid / norm, 0.0, 1.0)) * min(1.0, len(names) / 4)
    return (180.0 if deg == -180.0 else deg), confidence
