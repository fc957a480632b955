"""Ink: how much darker than the paper each pixel of a page is, with the page's tilt and grid lines taken out.

The first steps of the classical digitiser (`digitize`): they use only what every printed ECG shares (the pen
is darker than the paper in every colour channel; grid and traces run horizontally), never a renderer's metadata.
"""
from __future__ import annotations

import cv2
import numpy as np

# One OpenCV thread (as in drawing.py): pages are digitised in the embedding process between forks of
# render workers, and an OpenCV thread pool alive at a fork deadlocks the children (seen: index build).
cv2.setNumThreads(1)

INK_ON = 110  # ink strength (0-255) that counts as a pen stroke
BROKEN = 0.02  # share of a page's ink in stroke pieces that marks a thin pen's broken strokes (solid pens: ~0.1 %)


def ink_map(page: np.ndarray, core_pct: float = 99.7) -> np.ndarray:
    """(H, W) uint8 ink strength 0-255: how much darker than the local paper the brightest channel is.

    A coloured grid line is bright in at least one channel, a trace is dark in all of them; the local
    paper level (a grey closing over ~3 mm, then smoothed) cancels shadows, glare and paper tone. The
    strength is then stretched so the page's darkest strokes (the traces' cores) reach 255: grey grid
    lines, which are lighter than the pen, land below INK_ON. A page whose text and ticks are much darker than
    its traces (a thin-pen printout) is read again with a lower `core_pct` (`digitize`).
    """
    r, g, b = cv2.split(page)
    bright = cv2.GaussianBlur(cv2.max(cv2.max(r, g), b), (3, 3), 0)
    k = max(9, int(round(page.shape[1] / 100)) | 1)
    paper = cv2.morphologyEx(bright, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    # smoothed, but never brighter than the closing: at a shadow's edge the blur would lift the paper level over
    # the dark side and turn a blotch's rim into a stroke (ECG-Image-Kit wrinkles+augment 4.2 -> 4.9 dB)
    paper = cv2.min(cv2.blur(paper, (k, k)), paper)
    dark = cv2.divide(cv2.subtract(paper, bright), cv2.max(paper, 40), scale=255)  # uint8, saturating
    sample = dark[::2, ::2]
    core, texture = (float(v) for v in np.percentile(sample, [core_pct, 90.0]))
    lo = max(0.3 * core, texture + 8.0)  # below: paper texture, noise, colour grid
    hi = max(lo + 32.0, 0.85 * core)  # above: a pen stroke for sure
    return cv2.multiply(cv2.subtract(dark, int(lo)), 1, scale=255.0 / (hi - lo))  # saturates at 0 and 255


def rotate(img: np.ndarray, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def deskew_angle(ink: np.ndarray, max_deg: float = 8.0) -> float:
    """Degrees to rotate so the ink's row profile is sharpest (coarse 0.5° search, then 0.1°)."""
    small = cv2.resize(ink.astype(np.float32), (400, max(8, int(round(ink.shape[0] * 400 / ink.shape[1])))),
                       interpolation=cv2.INTER_AREA)

    # the picture's own edges are left out: ink_map inks its first and last rows right across, and those stay
    # level at 0 degrees only, outscoring a tilted page's rows (a page rotated 0.4 degrees was read at 0)
    my, mx = max(2, small.shape[0] // 30), max(2, small.shape[1] // 30)

    def score(a: float) -> float:
        prof = rotate(small, a)[my:-my, mx:-mx].sum(axis=1)
        return float(np.sum(np.diff(prof) ** 2))

    coarse = np.arange(-max_deg, max_deg + 1e-6, 0.5)
    best = float(coarse[int(np.argmax([score(a) for a in coarse]))])
    fine = np.arange(best - 0.4, best + 0.41, 0.1)
    return float(fine[int(np.argmax([score(a) for a in fine]))])


def remove_grid_lines(ink: np.ndarray) -> np.ndarray:
    """Subtract long straight horizontal and vertical strokes (grey grid lines; traces are never that straight),
    then specks (grid crossings, noise), joining a thin pen's broken strokes first (`join_strokes`)."""
    h, w = ink.shape
    horiz = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 8), 1)))
    vert = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(3, h // 4))))
    return join_strokes(cv2.subtract(ink, cv2.max(horiz, vert)))


def join_strokes(ink: np.ndarray) -> np.ndarray:
    """`ink` without specks (blobs too small to be a stroke: what is left where grid lines cross, speckle noise); on a
    page whose pen strokes come apart, with their pieces joined again first.

    Why: a thin pen's steep QRS strokes are anti-aliased to half strength (a 1-px line drawn at a slant), so on a GE
    or Mortara printout, or a phone photo of one, the threshold alone leaves each spike a dashed line, and its dashes
    were dropped as specks: the trace lost its QRS complexes. Where over BROKEN of the ink lies in such pieces that
    hang together with a stroke at half strength, every half-strength pixel connected to a stroke counts as ink
    (hysteresis). Only there: on pages drawn with a solid pen (broken share ~0.1 %), the half-strength rim widens
    every stroke and costs 0.1-0.5 dB (own pages)."""
    w = ink.shape[1]
    speck = max(6, (w // 320) ** 2)
    strong = (ink > INK_ON).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < speck
    small[0] = False
    enough = BROKEN * max(1, int(strong.sum()))
    if stats[small, cv2.CC_STAT_AREA].sum() >= enough:  # pieces enough to matter, if they hang on strokes
        _, weak_labels, weak_stats, _ = cv2.connectedComponentsWithStats((ink > INK_ON // 2).astype(np.uint8),
                                                                         connectivity=8)
        stroke = np.zeros(len(weak_stats), bool)  # half-strength blobs holding a stroke
        stroke[np.unique(weak_labels[(strong > 0) & ~small[labels]])] = True
        stroke[0] = False
        if (small[labels] & stroke[weak_labels]).sum() >= enough:
            joined = stroke[weak_labels]
            return np.where(joined, np.maximum(ink, INK_ON + 1), np.where(strong > 0, 0, ink)).astype(np.uint8)
    return np.where(small[labels], 0, ink).astype(np.uint8)
