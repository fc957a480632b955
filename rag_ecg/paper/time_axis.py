"""Where a read row's samples lie on the page, to a fraction of a pixel: the ticks between leads set the time axis.

Why: the Challenge SNR forgives a shift by whole samples only, and at the working width a 10-ms sample is 1.35 px:
a read whose samples sit a third of a sample off the recorded ones loses several dB (own clean pages: 17.5 dB
when read at the true sample positions, 12.9 from the traced extent, 16.3 from the ticks). A row's traced extent is known to a whole
pixel and starts wherever a printer's pen first inks; the ticks many printers draw where a row switches lead mark
the switch's time itself, k T / n of the row. The ticks of all rows give one time axis per row (rows share the
page's time scale), rows without ticks (a rhythm strip) start as far from their first ink as the ticked rows do;
a page without ticks keeps its traced extents.
"""
from __future__ import annotations

import numpy as np

from rag_ecg.paper.ink import INK_ON

AXIS_AGREES = 0.03  # ticks implying a row length, or a start, over 3 % of the row off its traced extent: not ticks


def tick_centre(ink: np.ndarray, base: float, reach: int, span: tuple[int, int]) -> float | None:
    """Sub-pixel column of a separator tick found over columns `span` (inclusive): the median over the tick's rows
    (within `reach` px of the baseline, the baseline's own rows left out: the trace runs there) of each row's
    ink-weighted centre."""
    s, e = span
    lo, hi = max(0, int(round(base - reach))), min(ink.shape[0], int(round(base + reach)) + 1)
    block = ink[lo:hi, max(0, s):e + 1].astype(np.float64)
    rows = np.abs(np.arange(lo, hi) - base) > 0.3 * reach
    weights = np.clip(block[rows] - INK_ON / 2, 0, None)
    total = weights.sum(axis=1)
    ok = total > 0
    if not ok.any():
        return None
    cols = max(0, s) + np.arange(block.shape[1])
    return float(np.median((weights[ok] * cols).sum(axis=1) / total[ok]))


def row_axes(extents: list[tuple[int, int]], ticks: list[list[tuple[int, float]]], n_cols: list[int],
             n_samples: int) -> tuple[list[tuple[float, float]], bool]:
    """(per row, (column of sample 0, columns per sample) of a read with `n_samples` over the row; whether ticks set
    them).

    `ticks[r]`: (boundary k of the row's `n_cols[r]` columns, the tick's sub-pixel column). A row with two or more
    ticks: a straight line through them; one tick: the traced extent's scale through it. Fits that disagree with
    the traced extent (a QRS taken for a tick) are dropped. Rows without: the ticked rows' median scale and their
    median start relative to the first ink (carrying the ticked rows' axes down the page by height, for a photo's
    leftover perspective, gained 1 dB on own photos' rhythm strips and lost 0.6 dB on clean ones). With no ticks,
    sample 0 is the first inked column and the last inked one is 10 s later."""
    fits: dict[int, tuple[float, float]] = {}
    for r, ((a, b), tk, n) in enumerate(zip(extents, ticks, n_cols)):
        span = b - a
        if span <= 0 or not tk:
            continue
        k, x = (np.asarray(v, np.float64) for v in zip(*tk))
        width = float(np.polyfit(k, x, 1)[0]) if len(tk) >= 2 else span / n
        start = float(np.median(x - k * width))
        if abs(width * n / span - 1.0) <= AXIS_AGREES and abs(start - a) <= AXIS_AGREES * span:
            fits[r] = (start, width * n / n_samples)
    if not fits:
        return [(float(a), (b - a) / n_samples) for a, b in extents], False
    offset = float(np.median([fits[r][0] - extents[r][0] for r in fits]))
    step = float(np.median([f[1] for f in fits.values()]))
    return [fits.get(r, (a + offset, step)) for r, (a, _) in enumerate(extents)], True
