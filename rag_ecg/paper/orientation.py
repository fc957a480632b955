"""Which way round a page is: a page scanned sideways (90° or 270°) or upside down is read the right way up.

Sideways: trace rows run across a page, so its ink is organised in rows (`lines_across` > 0); a page whose ink
runs in columns is read both quarter turns first (and so is any page refused as given). Of the two quarter-turn
reads — the same page 180° apart — the one with more rows starting in a calibration pulse standing up than ending
in one hanging down wins, then the one whose traces skew upward (`row_skew`: QRS spikes point up in most leads;
weak on the Khan printouts, where 7 of 27 upright pages skew below -1.9, so it only breaks ties). Upside down is
told by the pulses (`rows.pulse_sides`): most rows end in a pulse hanging down and none starts with one standing
up, and the page turned 180° shows them standing up at the rows' starts. Measured on 52 real and ECG-Image-Kit
pictures: 52/52 kept upright, 50/52 read right at 90° and 50/52 at 270° (was 28 and 26: the upright read
accepted sideways pages, and skew chose the quarter), 45/52 at 180° (the rest print no pulse and are read as they
lie); own fold-9 pages (clean/scan/photo/random): 40/40 upright, 80/80 sideways, 34/40 at 180°.
"""
from __future__ import annotations

import numpy as np

from rag_ecg.paper.ink import INK_ON

MIDDLE_ROWS = 0.5  # `lines_across` of a picture's middle above which its rows run across (`looks_sideways`)


def row_skew(signal: np.ndarray, row_leads: list[list[int]]) -> float:
    """Median over printed rows of the skewness of the row's trace (its leads' time windows side by side).

    Upright pages: -1.1 .. 3.4; the same pages upside down: -4.4 .. -2.9 (40 PTB-XL fold-9 pages, clean and
    scan): QRS spikes point down, and the calibration pulse, now at the row's right end, drops below it."""
    n = signal.shape[1]
    vals = []
    for leads in row_leads:
        k = len(leads)
        row = np.concatenate([signal[lead, c * n // k:(c + 1) * n // k] for c, lead in enumerate(leads)])
        sd = float(row.std())
        if sd > 1e-6:
            vals.append(float(np.mean((row - row.mean()) ** 3)) / sd ** 3)
    return float(np.median(vals)) if vals else 0.0


def lines_across(ink: np.ndarray) -> float:
    """How much more the ink is organised in rows across the page than in columns down it: log of the ratio of
    the contrast (coefficient of variation) of the row-sum profile to that of the column-sum profile.

    Trace rows make the row-sum profile peak at every baseline while the column sums stay even, so an upright
    page scores > 0 and the same page on its side < 0. Measured on 52 real and ECG-Image-Kit pictures + 40
    own fold-9 pages (clean/scan/photo/random): upright -0.10 (one phone photo) .. q05 0.31; sideways q95 -0.42,
    max -0.09. Cheap (one pass over the ink map), so it is asked before any read: a sideways page the upright
    read would accept (the segmenter follows a vertical trace's wiggle as rows) is turned first."""
    on = (ink >= INK_ON).astype(np.float32)
    return float(np.log(_contrast(on.sum(axis=1)) / _contrast(on.sum(axis=0))))


def looks_sideways(ink: np.ndarray) -> bool:
    """Whether a page's ink runs in columns (`lines_across` < 0) and does so in the picture's middle too.

    A phone photo with the dark table beside the page inks that border as columns: on its own, `lines_across` then
    turned an upright photo sideways first (four reads, ~6 s). The middle 60 % of the picture shows the page's own
    rows: the one upright page with a negative whole-picture score scores 0.85 there; sideways pictures at most 0.29
    (42 real and 40 ECG-Image-Kit pictures, 40 own photo/random pages, each upright and turned a quarter)."""
    if lines_across(ink) >= 0:
        return False
    h, w = ink.shape
    return lines_across(ink[int(0.2 * h):int(0.8 * h), int(0.2 * w):int(0.8 * w)]) < MIDDLE_ROWS


def _contrast(profile: np.ndarray) -> float:
    smooth = np.convolve(profile, np.ones(5) / 5, mode="same")
    return float(smooth.std() / (smooth.mean() + 1e-6)) + 1e-6
