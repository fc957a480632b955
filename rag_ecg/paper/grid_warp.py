"""Wrinkled paper: how far the paper moved sideways under each read sample, from the grid lines around its row.

Why: a wrinkle bends the page a pixel or two back and forth along a row, and at 1.35 px per 10-ms sample that
moves a lead's QRS complexes by a sample one way here and another there, which no whole-lead shift undoes (own
pages wrinkled at 0.5: the best shift of a lead's 0.5-s windows spreads 0.44 samples, 0.19 on the flat page).
The vertical grid lines were printed exactly every 1 mm, so their local phase along the row (the profile of the
row's band demodulated at the grid's pitch) is where the paper moved. Only the bends are taken: a row's straight
trend (scale and start) is the read's own time axis (`time_axis`), fitted on the ticks between leads. Own pages
wrinkled at 0.5: the windows' spread 0.44 -> 0.28 samples, SNR 10.3 -> 11.8 dB; flat pages unchanged.
"""
from __future__ import annotations

import cv2
import numpy as np

from rag_ecg.data.records import STANDARD_LEADS

SMOOTH_MM = 6.0  # the demodulation's Gaussian window (sigma), mm: wrinkles bend over centimetres
MIN_AMPLITUDE = 0.35  # a window's grid response below this share of the row's median: no grid seen there
MIN_SEEN = 0.6  # share of a row's windows that must see the grid for its bends to be used


def row_bends(lines: np.ndarray, y: float, half: float, x0: float, x1: float, px_per_mm: float,
              minor: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(columns, sideways displacement in px) along one row of a grid-line map (`calibration.grid_map`), straight
    trend removed; None where the band shows too little grid. `minor`: the 1 mm lines are resolved (else the
    5 mm ones are demodulated)."""
    period = px_per_mm if minor else 5 * px_per_mm
    h, w = lines.shape
    a, b = max(0, int(x0 - 2 * period)), min(w, int(x1 + 2 * period) + 1)
    top, bot = max(0, int(y - half)), min(h, int(y + half) + 1)
    if b - a < 10 * period or bot - top < 3:
        return None
    profile = lines[top:bot, a:b].mean(axis=0).astype(np.float64)
    xs = np.arange(a, b, dtype=np.float64)
    wave = (profile - profile.mean()) * np.exp(-2j * np.pi * xs / period)
    sigma = max(SMOOTH_MM * px_per_mm, period)
    smooth = [cv2.GaussianBlur(part.reshape(1, -1), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT).ravel()
              for part in (wave.real, wave.imag)]
    c = smooth[0] + 1j * smooth[1]
    amp = np.abs(c)
    seen = amp > MIN_AMPLITUDE * np.median(amp)
    if seen.mean() < MIN_SEEN:
        return None
    shift = -np.unwrap(np.angle(c)) * period / (2 * np.pi)  # the lines' offset: right is positive
    shift = np.interp(xs, xs[seen], shift[seen])
    trend = np.polyval(np.polyfit(xs[seen], shift[seen], 1, w=amp[seen]), xs)
    return xs, np.clip(shift - trend, -0.5 * period, 0.5 * period)


def sample_shifts(lines: np.ndarray, rows: list[float], boxes: list, px_per_mm: float, minor: bool,
                  px_per_s: float, n_samples: int, fs: float) -> np.ndarray | None:
    """(12, n_samples) float32 seconds by which each read sample's paper moved later (0 where unknown), from the
    bends of the rows its lead boxes lie on; None when no row shows a grid. `boxes`: `Digitized.boxes`."""
    if len(rows) < 2:
        return None
    half = 0.15 * float(np.median(np.diff(rows)))  # a band along the baseline: bends change down the page
    out = np.zeros((12, n_samples), np.float32)
    bends: dict[float, tuple[np.ndarray, np.ndarray] | None] = {}
    for lead, (bx0, by0, bx1, by1), t0, t1 in boxes:  # in order: a rhythm strip overwrites its lead's column
        y = 0.5 * (by0 + by1)
        if y not in bends:
            spans = [(b[0], b[2]) for _, b, _, _ in boxes if 0.5 * (b[1] + b[3]) == y]
            bends[y] = row_bends(lines, y, half, min(s[0] for s in spans), max(s[1] for s in spans),
                                 px_per_mm, minor)
        if bends[y] is None:
            continue
        xs, dx = bends[y]
        j = np.arange(int(round(t0 * fs)), min(n_samples, int(round(t1 * fs))))
        at = bx0 + (j / fs - t0) / (t1 - t0) * (bx1 - bx0)
        out[STANDARD_LEADS.index(lead), j] = np.interp(at, xs, dx) / px_per_s
    return out if any(v is not None for v in bends.values()) else None
