"""Rhythm strips: which lead a full-length strip under a 3x4 (or 6x2) block shows, read from the traces themselves.

Why: printers put one to three rhythm strips under the 3x4 block (lead II alone; V1, II and V5 on GE pages), and a
six-row page is either that or a 6x2 page. A strip records the same 10 s as the block, so over one of the block's
four 2.5-s windows it draws exactly the signal of the block's cell there (its own lead), and over the other three
windows it draws leads of its own. Matching each strip window against the block's cells therefore names the strip
without reading its label, on any printer (a hospital's III strips, GE's V1/II/V5). Whether six rows are a block
and three strips or a 6x2 page, the limb leads say (`says_3x4`): over 2.5-5 s the block's rows hold aVR, aVL and aVF,
which sum to zero, while a 6x2 page's rows there hold I, II and III, where I + III = II (Einthoven's law).
"""
from __future__ import annotations

import numpy as np

from rag_ecg.paper.layout import LEAD_ROWS

BLOCK = LEAD_ROWS["3x4"]  # the block's cells: BLOCK[row][window]
MATCH = 0.5  # a cell is the strip's own lead when the two reads differ by at most half their size (noise: ~0.2)
UNIQUE = 0.6  # ... and every other cell differs at least 1 / 0.6 times as much
TRIM = 0.03  # share of a window's samples left out of a difference (`_trimmed_norm`): 8 of 250
MAX_LAG = 5  # samples each way (50 ms at 100 Hz) the strip's and the cell's time axes may disagree
LIMB_LAW = 0.75  # a block's 2.5-5 s rows sum to zero this much better than I + III = II holds there: aVR, aVL, aVF
# (3x4 pages of LUDB drawn clean: 0.2-0.7; 6x2 pages of PTB-XL drawn clean or photographed: 0.86 and more)
GE_STRIPS = ("V1", "II", "V5")  # the three strips GE prints, top to bottom
RHYTHM_LEADS = ("II", "III", "V1", "V5")  # leads printers put in rhythm strips; a strip matching another lead best
# (aVF beside II: alike whenever III is like II) is not named after it: a misnamed II strip costs lead II its 10 s


def strip_names(block: list[np.ndarray], strips: list[np.ndarray],
                fallback: str | None = None) -> list[str | None] | None:
    """The lead of each strip under a block (3x4: three rows; 6x2: six) (None: not named), or None when the rows are
    not a 3x4 block and strips.

    One strip: named from the traces (one of RHYTHM_LEADS), else `fallback`. Several (under a 3x4 block): the rows are
    a block and strips when two or more are named or the limb leads say so (`says_3x4`). Three strips take GE's
    V1/II/V5 when two of those leads are among their strips' best matches and no strip names another lead (a paced
    rhythm, or V1 beside V2, draws leads so alike that no single cell stands out; a strip's tall R waves meeting the
    strip above spoil its read)."""
    diffs = [cell_differences(block, s) for s in strips]
    names = [n if n in RHYTHM_LEADS else None for n in map(_named, diffs)]
    if len(strips) == 1:
        return [names[0] or fallback]
    if sum(n is not None for n in names) < 2 and not says_3x4(block):
        return None
    if (len(strips) == 3 and sum(_among_best(d, lead) for d, lead in zip(diffs, GE_STRIPS)) >= 2
            and all(n in (None, lead) for n, lead in zip(names, GE_STRIPS))):
        return list(GE_STRIPS)
    return names


def _named(diffs: np.ndarray) -> str | None:
    """The cell that matches (`MATCH`) clearly better than every other (`UNIQUE`), or None."""
    r, c = np.unravel_index(int(np.argmin(diffs)), diffs.shape)
    best = float(diffs[r, c])
    others = np.delete(diffs.ravel(), r * diffs.shape[1] + c)
    return _cells(diffs)[r][c] if best <= MATCH and best <= UNIQUE * float(others.min()) else None


def _cells(diffs: np.ndarray) -> list[list[str]]:
    """The leads of a block's cells by the shape of its differences: 3 x 4 (3x4) or 6 x 2 (6x2)."""
    return BLOCK if diffs.shape == (3, 4) else LEAD_ROWS["6x2"]


def _among_best(diffs: np.ndarray, lead: str) -> bool:
    """Whether `lead`'s cell matches (`MATCH`) and no cell matches clearly better (`UNIQUE`)."""
    r = next(i for i, row in enumerate(BLOCK) if lead in row)
    d = float(diffs[r, BLOCK[r].index(lead)])
    return d <= MATCH and UNIQUE * d <= float(diffs.min())


def says_3x4(block: list[np.ndarray]) -> bool:
    """Whether the three rows' second quarter (2.5-5 s) obeys aVR + aVL + aVF = 0 clearly better than I + III = II:
    a 3x4 block rather than the top of a 6x2 page."""
    n = block[0].size
    a, b, c = (_flat(row[n // 4:n // 2].astype(np.float64)) for row in block)
    size = max(1e-6, (np.linalg.norm(a) + np.linalg.norm(b) + np.linalg.norm(c)) / 3)
    return bool(np.linalg.norm(a + b + c) / size < LIMB_LAW * np.linalg.norm(a + c - b) / size)


def cell_differences(block: list[np.ndarray], strip: np.ndarray) -> np.ndarray:
    """(rows, windows) relative difference between the strip and each block cell over the cell's window (a 3x4
    block: 3 x 4 windows of 2.5 s; a 6x2 block: 6 x 2 of 5 s): the norm of their difference (`_trimmed_norm`) over
    the geometric mean of their norms (baselines removed; 0 = the same trace; amplitude counts), at the best lag
    within MAX_LAG."""
    n = strip.size
    k = 4 if len(block) == 3 else 2
    out = np.full((len(block), k), np.inf)
    for c in range(k):
        a, b = c * n // k, (c + 1) * n // k
        for r, row in enumerate(block):
            for lag in range(-MAX_LAG, MAX_LAG + 1):
                lo, hi = max(a, a + lag), min(b, b + lag)  # strip samples lo..hi against row samples lo-lag..hi-lag
                x = _flat(strip[lo:hi])
                y = _flat(row[lo - lag:hi - lag])
                size = np.sqrt(np.linalg.norm(x) * np.linalg.norm(y))
                if size > 1e-6:
                    out[r, c] = min(out[r, c], _trimmed_norm(x - y) / size)
    return out


def _trimmed_norm(d: np.ndarray) -> float:
    """The norm of `d` without its largest TRIM share of samples: a calibration pulse's edge left at a row's start or a
    tick bridged at a column's end is a few samples of one read, not a difference between two leads (which runs
    through every beat)."""
    keep = d.size - int(TRIM * d.size)
    return float(np.sqrt(np.sort(d * d)[:keep].sum()))


def _flat(x: np.ndarray) -> np.ndarray:
    """`x` less its least-squares straight line (the strip and the cell may sit at different baselines)."""
    if x.size < 3:
        return np.zeros(x.size)
    t = np.arange(x.size, dtype=np.float64) - 0.5 * (x.size - 1)
    x = x.astype(np.float64)
    return x - x.mean() - t * (float(t @ x) / float(t @ t))


def layout_name(strips: list[str], block: str = "3x4") -> str:
    """The layout of a block ("3x4", "6x2") with rhythm strips of these leads, top to bottom: "3x4+II",
    "3x4+V1/II/V5", "6x2+V1"."""
    return f"{block}+" + "/".join(strips) if strips else block


def layout_rows(layout: str, rhythm_lead: str = "II") -> list[list[str]]:
    """Leads of each printed row of `layout` ("3x4", "6x2", "12x1", "3x4+II", "3x4+V1/II/V5", "6x2+V1"); "3x4+II" and
    "6x2+II" stand for a block with one strip of `rhythm_lead` (as the renderer names every one-strip page)."""
    block, _, strips = layout.partition("+")
    if block not in ("3x4", "6x2", "12x1") or (strips and block == "12x1"):
        raise ValueError(f"unknown layout {layout!r}")
    if not strips:
        return LEAD_ROWS[block]
    leads = [rhythm_lead] if strips == "II" else strips.split("/")
    return LEAD_ROWS[block] + [[lead] for lead in leads]
