"""Millimetres on the paper: px/mm from the grid's pitch, confirmed by the calibration pulse, then a read in mV.

Why from the paper itself: a picture's dpi, the camera's distance and the scanner's zoom are unknown, but every
ECG is printed on a 1 mm / 5 mm grid and most print a 1 mV x 200 ms calibration pulse at each row's left end.
The grid's pitch gives px/mm (at 10 mm/mV and 25 mm/s it is the whole amplitude and time scale); the pulse
confirms it, or stands in on grid-less paper; a page with neither falls back on its row length being 10 s.

Grid pitch: a grid-line map (how much darker than the local paper the darkest channel is, trace ink masked out:
coloured grid lines are dark in one channel, grey ones in all, traces are masked) is averaged into column and row
profiles per tile; each profile's autocorrelation is fitted by a two-comb model (lines every p, heavier lines
every 5p) over candidate pitches p, and the best fit wins. The model tells the 1 mm lines from the 5 mm ones:
the 5 mm comb must carry every fifth peak, and where the 1 mm lines are unresolved (a 768-px-wide picture of a
page: ~2.7 px/mm) the 5 mm comb alone fits. Tiles (a 3x3 split) keep perspective and local damage to a few
estimates; the median is the page's px/mm and the tiles' spread says how much the scale varies over the page.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from rag_ecg.paper.digitize import FAINT_CORE_PCT, FS, N_SAMPLES, T_SECONDS, Digitized
from rag_ecg.paper.grid_warp import sample_shifts
from rag_ecg.paper.ink import INK_ON, ink_map, remove_grid_lines

log = logging.getLogger(__name__)

MIN_PPM, MAX_PPM = 3.4, 16.5  # working px per mm: a 1600-px working page shows 100-470 mm of paper
GRID_MIN_FIT = 0.35  # a tile's autocorrelation fit (R^2) below this: the tile shows no grid
GRID_MIN_CONFIDENCE = 0.15  # page-level confidence below this: no usable grid
UNIFORM_MIN_FIT = 0.85  # ... and this for a comb of equal lines (no heavier 5 mm lines seen)
MIN_SHARPNESS = 0.15  # `_sharpness` of grid lines: >= 0.9 on scans, 0.2-0.8 on blurred photos; waves ~0.08
AGREE = 0.1  # a tile's px/mm within 10 % of the tiles' median agrees with it
PULSE_AGREES = 0.08  # pulse and grid px/mm within 8 %: the pulse confirms the grid
AUTO_GAINS = (5.0, 10.0, 20.0)  # mm/mV a calibration pulse may switch to when no gain was given
FLAT_GRID = 0.02  # grid spread at or below this: a flat page, whose px/mm holds across it (time_scale)
TIME_FIT = 0.02  # rows within 2 % of 10 s on such a grid: a 10-s page whose time axis the grid corrects


@dataclass
class GridScale:
    """The grid's pitch as measured on the working page."""

    px_per_mm: float | None  # None: no grid seen
    confidence: float  # 0-1: tile fit quality x share of tiles that agree
    source: str  # "grid", or "none" when no grid was seen
    minor_seen: bool  # the 1 mm lines were resolved
    major_seen: bool  # the 5 mm lines were seen
    spread: float = 0.0  # (90th - 10th percentile) / median of the tiles' px/mm (perspective, wrinkles)
    tiles: int = 0  # tile profiles that saw a grid (of up to 18: 9 tiles x columns and rows)
    px_per_mm_y: float | None = None  # from the horizontal lines alone: the amplitude scale (a photo's
    # perspective squeezes one axis more than the other)


@dataclass
class Pulse:
    """The calibration pulses found at the rows' left ends (a rectangle 1 mV high, 200 ms wide)."""

    height_px: float  # median pulse height (pen centre to pen centre), working px
    width_px: float  # median pulse width, working px
    rows: int  # rows where a pulse was found
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (x0, y0, x1, y1) working px

    def px_per_mm(self, speed_mm_s: float, gain_mm_mv: float) -> float:
        """px/mm the pulse implies at this speed and gain (its height; the width only where it agrees)."""
        by_h = self.height_px / gain_mm_mv
        by_w = self.width_px / (0.2 * speed_mm_s)
        return 0.5 * (by_h + by_w) if abs(by_w / by_h - 1.0) < 0.15 else by_h


@dataclass
class Calibration:
    """The scales a read page is converted with: px/mm (and where it came from), paper speed and gain."""

    px_per_mm: float
    source: str  # "grid" | "pulse" | "assumed" (row length = 10 s at the paper speed)
    speed_mm_s: float
    gain_mm_mv: float
    grid: GridScale
    pulse: Pulse | None = None
    pulse_px_per_mm: float | None = None  # what the pulse alone implies
    px_per_mm_y: float | None = None  # vertical scale where it differs (a photo's perspective); None: px_per_mm
    row_seconds: float | None = None  # the rows' length in seconds at this px/mm and speed (10 on a 10-s page)
    notes: list[str] = field(default_factory=list)  # one line each: confirmations, disagreements, fallbacks
    ticks: bool = False  # the read's time axis came from the ticks between leads (`Digitized.time_axis`)
    shifts: np.ndarray | None = None  # (12, N) s each read sample's paper moved later (`grid_warp`: wrinkles)

    @property
    def px_per_mv(self) -> float:
        """Vertical px per millivolt: what a trace height in working px is divided by."""
        return (self.px_per_mm_y or self.px_per_mm) * self.gain_mm_mv

    @property
    def px_per_s(self) -> float:
        return self.px_per_mm * self.speed_mm_s

    @property
    def time_scale(self) -> float:
        """Paper seconds per second of the read's 10-s axis: the rows' length measured on a flat grid over 10 s.

        The read stretches each row's traced extent to 10 s, but a pen's line ends a few px inside its time window
        (our pages: 9.95 s; ECG-Image-Kit: 9.96 s); over a 10-s rhythm strip that drift costs its QRS complexes
        their alignment (own clean pages 9.3 -> 10.6 dB, ECG-Image-Kit clean 9.8 -> 10.3). A read timed by the ticks
        between leads needs none: they mark the time itself, where the grid's px/mm is good to ~0.05 %, half a
        sample over a 10-s strip (own clean pages 13.0 -> 16.3 dB). Otherwise only a flat grid
        (spread <= FLAT_GRID, not a photo's perspective, which measured 9.6-10.2 s) and a row within
        TIME_FIT of 10 s (a 10-s page) are trusted; otherwise 1."""
        ok = (not self.ticks and self.source == "grid" and self.row_seconds is not None
              and self.grid.spread <= FLAT_GRID and abs(self.row_seconds / T_SECONDS - 1.0) <= TIME_FIT)
        return float(self.row_seconds / T_SECONDS) if ok else 1.0

    def to_json(self) -> dict:
        d = {"px_per_mm": round(self.px_per_mm, 4), "source": self.source, "speed_mm_s": self.speed_mm_s,
             "gain_mm_mv": self.gain_mm_mv, "px_per_mv": round(self.px_per_mv, 3),
             "px_per_mm_y": None if self.px_per_mm_y is None else round(self.px_per_mm_y, 4),
             "row_seconds": None if self.row_seconds is None else round(self.row_seconds, 3),
             "grid": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self.grid).items()},
             "time_axis": "ticks" if self.ticks else "extent", "pulse": None, "notes": list(self.notes)}
        if self.pulse is not None:
            d["pulse"] = {"height_px": round(self.pulse.height_px, 2), "width_px": round(self.pulse.width_px, 2),
                          "rows": self.pulse.rows, "px_per_mm": round(self.pulse_px_per_mm or 0.0, 4),
                          "boxes": [[round(v, 1) for v in b] for b in self.pulse.boxes]}
        return d


# ---------------------------------------------------------------- grid


def grid_map(work_rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32: how much darker than the local paper the darkest channel is, trace ink masked out.

    A red, pink, green, blue or orange grid line is dark in its complementary channels, a grey one in all
    three; the pen is dark in all three and darker than any grid, which `ink_map` (the brightest channel)
    finds (at its usual contrast: the fainter-stroke scale of `trace_ink` would mask parts of a grey grid): those
    pixels are masked so traces, text and stamps do not add their own periodicities."""
    low = cv2.min(cv2.min(work_rgb[..., 0], work_rgb[..., 1]), work_rgb[..., 2])
    k = max(5, int(round(work_rgb.shape[1] / 200)) | 1)  # wider than a grid line, narrower than a 1 mm gap
    paper = cv2.blur(cv2.dilate(low, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))), (k, k))
    lines = cv2.subtract(paper, low).astype(np.float32)
    pen = cv2.dilate((ink_map(work_rgb) >= INK_ON).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    # masked pixels take the local mean of the unmasked ones: zeros would stamp the traces' own pattern (rows,
    # beats) into the profiles as holes in the paper's noise
    keep = (~pen).astype(np.float32)
    win = (6 * k + 1, 6 * k + 1)
    fill = cv2.blur(lines * keep, win) / np.maximum(cv2.blur(keep, win), 1e-3)
    return np.where(pen, fill, lines).astype(np.float32)


def grid_scale(work_rgb: np.ndarray, lines: np.ndarray | None = None) -> GridScale:
    """The grid's px/mm on a working page ((H, W, 3) uint8 RGB, deskewed), measured in 3x3 tiles (`lines`: its
    `grid_map`, if made)."""
    lines = grid_map(work_rgb) if lines is None else lines
    h, w = lines.shape
    ny = max(2, min(8, int(round(3 * h / max(1, w)))))
    fits, tried = [], 0
    strip = max(48, w // 16)  # lines tilt under perspective: profiles of short strips stay sharp
    for i in range(ny):
        for j in range(3):
            tile = lines[i * h // ny:(i + 1) * h // ny, j * w // 3:(j + 1) * w // 3]
            for axis in ("x", "y"):
                fit = _pitch(_tile_autocorr(tile if axis == "x" else tile.T, strip))
                tried += 1
                # ECG paper has heavier 5 mm lines; where they hardly stand out, only a near-perfect comb counts
                # (a JPEG's 8-px block edges make a weak comb with no 5 mm lines)
                # (and grid lines are thin: a smooth wave of the same period, lighting or sensor pattern, is not)
                if fit is not None and fit[1] >= GRID_MIN_FIT and (fit[3] or fit[1] >= UNIFORM_MIN_FIT) \
                        and fit[4] >= MIN_SHARPNESS:
                    fits.append((axis, *fit))
    if not fits:
        return GridScale(None, 0.0, "none", False, False)
    # the largest group that agrees (by fit): perspective spreads a photo's tiles over ~10 %, a tile that
    # fitted text or a stamp lands anywhere
    support = [sum(g[2] for g in fits if abs(g[1] / f[1] - 1.0) < AGREE) for f in fits]
    centre = fits[int(np.argmax(support))][1]
    agree = [f for f in fits if abs(f[1] / centre - 1.0) < AGREE]
    ppm = np.array([f[1] for f in agree])
    med = float(np.median(ppm))
    lo, hi = np.percentile(ppm, [10, 90])
    confidence = float(np.median([f[2] for f in agree])) * len(agree) / max(tried, 1)
    minor = sum(f[3] for f in agree) >= 0.5 * len(agree)
    major = sum(f[4] for f in agree) >= 0.5 * len(agree)
    vertical = [f[1] for f in agree if f[0] == "y"]
    # a grid is square: its pitch shows in the columns and the rows alike (evenly spaced trace rows, as a
    # 12x1 page has, give the row profiles a period of their own)
    seen = confidence >= GRID_MIN_CONFIDENCE and len(vertical) >= 2 and len(agree) - len(vertical) >= 2
    return GridScale(med if seen else None, round(confidence, 3), "grid" if seen else "none", minor, major,
                     float((hi - lo) / med), len(agree), float(np.median(vertical)) if seen and vertical else None)


def _tile_autocorr(tile: np.ndarray, strip: int) -> np.ndarray:
    """Autocorrelation (lag 0 = 1, unbiased, up to half the tile's width) of the tile's column profile: the mean
    of its horizontal strips' autocorrelations. Shift-invariant, so a grid line that drifts sideways from strip
    to strip (a photo's perspective, a wrinkle) still adds up, where one long profile would smear it."""
    h, n = tile.shape
    k = max(1, h // strip)
    x = tile[:k * strip].reshape(k, -1, n).mean(axis=1).astype(np.float64) if h >= strip else tile.mean(0)[None]
    trend = cv2.GaussianBlur(x, (0, 0), sigmaX=2.5 * MAX_PPM, sigmaY=1e-3, borderType=cv2.BORDER_REFLECT)
    f = np.fft.rfft(x - trend, 2 * n, axis=1)  # slow trend removed: shading, paper tone
    ac = np.fft.irfft(f * np.conj(f), axis=1)[:, :n // 2].sum(axis=0)
    ac = ac / (n - np.arange(ac.size))
    return ac / ac[0] if ac[0] > 0 else ac


def _pitch(ac: np.ndarray) -> tuple[float, float, bool, bool, float] | None:
    """(px per mm, fit R^2, 1 mm lines seen, 5 mm lines seen, `_sharpness`) of a profile's autocorrelation, or None.

    The autocorrelation of a grid profile has peaks at every multiple of the 1 mm pitch p, taller ones at
    multiples of 5p. For each candidate p it is fitted by least squares with two Gaussian combs (at kp and at
    5kp, non-negative weights) plus a constant; the R^2 of the best p is the fit. A pitch that is a multiple of
    the true one misses peaks, a fraction of it predicts peaks that are not there: both fit worse."""
    lmax = ac.size
    if lmax < 5 * MIN_PPM * 2:
        return None
    half = int(np.argmax(ac < 0.5)) if (ac < 0.5).any() else lmax  # main lobe half-width -> peak width
    sigma = float(np.clip(half / 1.18, 0.7, 4.0))
    lags = np.arange(2, lmax, dtype=np.float64)
    y = ac[2:]
    best = None
    for grid in (np.exp(np.arange(np.log(MIN_PPM), np.log(MAX_PPM), 0.01)), None):
        if grid is None:  # refine around the coarse best
            grid = best[0] * np.exp(np.arange(-0.012, 0.0121, 0.001))
        r2, a1, a5 = _comb_fit(lags, y, grid, sigma)
        k = int(np.argmax(r2))
        if best is None or r2[k] >= best[1]:
            best = (float(grid[k]), float(r2[k]), float(a1[k]), float(a5[k]))
    p, r2, a1, a5 = best
    if 5 * p > lmax - 2:  # not even one 5 mm period in view
        return None
    return p, r2, a1 > 0.1 * max(a5, 1e-9) and a1 > 0.02, a5 > max(0.02, 0.1 * a1), _sharpness(ac, p)


def _sharpness(ac: np.ndarray, p: float) -> float:
    """How line-like the 5 mm peaks are: the drop from each peak (lag 5kp) to half a 1 mm pitch either side, over
    the drop from the peak to half a period (2.5p). Thin lines drop at once (~1), a smooth wave of the same
    period (shading, a sensor pattern) hardly (cos(pi/5) of its swing: ~0.1)."""
    lags = np.arange(ac.size)
    peaks = 5 * p * np.arange(1, int((ac.size - 1 - 3 * p) // (5 * p)) + 1)
    if peaks.size == 0:
        return 0.0
    at = lambda x: np.interp(x, lags, ac)  # noqa: E731
    near = at(peaks) - 0.5 * (at(peaks - 0.5 * p) + at(peaks + 0.5 * p))
    far = at(peaks) - at(peaks - 2.5 * p)
    return float(near.sum() / far.sum()) if far.sum() > 1e-9 else 0.0


def _comb_fit(lags: np.ndarray, y: np.ndarray, pitches: np.ndarray, sigma: float):
    """R^2 and the two comb weights of y ~ c + a1 * comb(p) + a5 * comb(5p) for each pitch p (vectorised)."""
    def comb(period: np.ndarray) -> np.ndarray:
        ph = lags[None, :] / period[:, None]
        d = (ph - np.round(ph)) * period[:, None]  # distance to the nearest multiple, px
        return np.exp(-0.5 * (d / sigma) ** 2)

    c1, c5 = comb(pitches), comb(5 * pitches)
    yc = y - y.mean()
    sst = float((yc ** 2).sum()) or 1e-12
    x1, x5 = c1 - c1.mean(1, keepdims=True), c5 - c5.mean(1, keepdims=True)
    s11, s55, s15 = (x1 * x1).sum(1), (x5 * x5).sum(1), (x1 * x5).sum(1)
    b1, b5 = x1 @ yc, x5 @ yc
    det = np.maximum(s11 * s55 - s15 ** 2, 1e-9)
    a1, a5 = (s55 * b1 - s15 * b5) / det, (s11 * b5 - s15 * b1) / det
    # non-negative weights: where one comes out negative, refit with the other alone
    only5 = np.maximum(b5, 0) / np.maximum(s55, 1e-9)
    only1 = np.maximum(b1, 0) / np.maximum(s11, 1e-9)
    neg1, neg5 = a1 < 0, a5 < 0
    a1 = np.where(neg1, 0.0, np.where(neg5, only1, a1))
    a5 = np.where(neg1, only5, np.where(neg5, 0.0, a5))
    sse = sst - 2 * (a1 * b1 + a5 * b5) + a1 ** 2 * s11 + a5 ** 2 * s55 + 2 * a1 * a5 * s15
    return 1.0 - sse / sst, a1, a5


# ---------------------------------------------------------------- calibration pulse


def trace_ink(work_rgb: np.ndarray) -> np.ndarray:
    """The pen's ink on a working page, grey grid lines removed, scaled by its fainter strokes (as the classical
    read's second try sees it): a thin-pen printout's traces and pulses stay above INK_ON next to its bold text."""
    return remove_grid_lines(ink_map(work_rgb, FAINT_CORE_PCT))


def row_spans(read: Digitized) -> list[tuple[float, float, float]]:
    """(baseline y, first column, last column) of each trace row of a read, working px (from its lead boxes)."""
    out = []
    for y in read.rows:
        xs = [b for _, b, _, _ in read.boxes if abs(0.5 * (b[1] + b[3]) - y) < 0.5]
        if xs:
            out.append((y, min(b[0] for b in xs), max(b[2] for b in xs)))
        else:
            out.append((y, float(read.x_range[0]), float(read.x_range[1])))
    return out


def find_pulse(ink: np.ndarray, spans: list[tuple[float, float, float]], pitch: float) -> Pulse | None:
    """The calibration pulses at the rows' ends of an ink map (working frame), or None if too few rows have one.

    A pulse is two vertical strokes of equal height joined by a level top, with empty paper under the top
    (a QRS complex has no level top, a label no empty inside). Searched from a little left of each row's trace
    start to a little into it (some printers run the pulse into the trace), then likewise at its end. Heights
    and widths are measured pen centre to pen centre; rows whose pulse height is off the rows' median by over
    10 % are dropped."""
    h, w = ink.shape
    found = []
    for y, a, b in spans:
        span = b - a
        y0, y1 = max(0, int(y - 0.85 * pitch)), min(h, int(y + 0.25 * pitch))  # above: not the row above
        # at the row's start (most printers), else at its end (Mortara and others print it after the trace)
        for x0, x1 in ((max(0, int(a - 0.08 * span)), min(w, int(a + 0.05 * span))),
                       (max(0, int(b - 0.05 * span)), min(w, int(b + 0.08 * span)))):
            if x1 - x0 < 8 or y1 - y0 < 8:
                continue
            hit = _pulse_in(ink[y0:y1, x0:x1], max(8.0, 0.1 * pitch))
            if hit is not None and all(np.isfinite(hit)):
                top, bottom, left, right = hit
                found.append((bottom - top, right - left, (x0 + left, y0 + top, x0 + right, y0 + bottom)))
                break
    if not found:
        return None
    med = float(np.median([f[0] for f in found]))
    keep = [f for f in found if abs(f[0] / med - 1.0) <= 0.1]
    if len(keep) < max(1, (len(spans) + 2) // 3):  # one row in four with a "pulse": a label, a QRS, not a pulse
        return None
    return Pulse(float(np.median([f[0] for f in keep])), float(np.median([f[1] for f in keep])), len(keep),
                 [tuple(float(v) for v in f[2]) for f in keep])


def _pulse_in(strength: np.ndarray, min_height: float) -> tuple[float, float, float, float] | None:
    """(top, bottom, left, right) pen-centre coordinates (sub-pixel: ink-weighted) of the tallest pulse in a
    region of an ink map, or None."""
    region = (strength > INK_ON).astype(np.uint8)
    h, w = region.shape
    tall = cv2.morphologyEx(region, cv2.MORPH_OPEN, np.ones((int(min_height), 1), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tall, connectivity=8)
    # vertical strokes: (left col, right col, top, bottom), left to right; an anti-aliased or slanted stroke is
    # one component, a QRS right beside the pulse's falling edge joins that stroke (below its top)
    strokes = sorted((int(st[0]), int(st[0] + st[2] - 1), int(st[1]), int(st[1] + st[3] - 1)) for st in stats[1:])
    best = None
    for i, s1 in enumerate(strokes):
        for s2 in strokes[i + 1:]:
            # the pulse rises from the baseline and falls back to it; one edge may run on below (the trace
            # starts, or ends, right beside it)
            top, bottom = max(s1[2], s2[2]), min(s1[3], s2[3])
            height = bottom - top
            tol = max(3.0, 0.12 * height)
            if height < min_height or top < 2 or abs(s1[2] - s2[2]) > tol \
                    or not 0.15 <= (s2[0] - s1[1]) / height <= 2.0:
                continue
            inner = range(s1[1] + 1, s2[0])
            lo = max(0, int(top - tol))  # text above the pulse (a header, a label) is not its top
            firsts = [lo + int(np.argmax(region[lo:, c])) if region[lo:, c].any() else -1 for c in inner]
            level = np.mean([f >= 0 and abs(f - top) <= tol for f in firsts])
            pen = max(1, int(np.median([_run_length(region[:, c], f) for c, f in zip(inner, firsts) if f >= 0] or [1])))
            inside = region[int(top + pen + 2):int(bottom - pen - 1), s1[1] + 1:s2[0]]
            floor = region[int(bottom - pen + 1):int(bottom + 1), s1[1] + 2:s2[0] - 1]  # open: the baseline pauses
            if level < 0.8 or (inside.size and inside.mean() > 0.03) or (floor.size and floor.mean() > 0.3):
                continue  # (letters like "III" have serifs along the bottom)
            near_top = range(int(top + 2 * pen), int(top + 2 * pen + 0.3 * height))  # the falling edge alone
            lead_in = list(range(max(0, s1[0] - 5), s1[0])) + list(range(s2[1] + 1, min(w, s2[1] + 6)))
            cand = (_centre(strength, top - 1, top + pen + 1, list(inner)[1:-1], top + 0.5 * (pen - 1)),
                    _centre(strength, bottom - pen - 1, bottom + 1, lead_in, bottom - 0.5 * (pen - 1)),
                    _centre(strength.T, s1[0] - 1, s1[1] + 1, near_top, 0.5 * (s1[0] + s1[1])),
                    _centre(strength.T, s2[0] - 1, s2[0] + (s1[1] - s1[0]) + 1, near_top, s2[0]))
            if best is None or cand[1] - cand[0] > best[1] - best[0]:
                best = cand
    return best


def _centre(strength: np.ndarray, lo: float, hi: float, cols, default: float) -> float:
    """Ink-weighted mean row in rows [lo, hi] over `cols` of a strength map (a stroke's centre line, sub-pixel);
    `default` where there is no ink there."""
    lo, hi = max(0, int(lo)), min(strength.shape[0], int(hi) + 1)
    cols = [c for c in cols if 0 <= c < strength.shape[1]]
    if hi <= lo or not cols:
        return float(default)
    block = np.clip(strength[lo:hi, cols].astype(np.float64) - INK_ON / 2, 0, None)
    total = block.sum()
    if total <= 0:
        return float(default)
    return float(lo + (block.sum(axis=1) * np.arange(hi - lo)).sum() / total)


def _run_length(col: np.ndarray, start: int) -> int:
    n = 0
    while start + n < col.size and col[start + n]:
        n += 1
    return n


# ---------------------------------------------------------------- calibrate and convert


def calibrate(work_rgb: np.ndarray, read: Digitized, speed_mm_s: float = 25.0, gain_mm_mv: float | None = None,
              ink: np.ndarray | None = None) -> Calibration:
    """The scales of a read page: px/mm from the grid (else the pulse, else a 10-s row), the gain, the speed.

    `work_rgb` is the page in `read`'s working frame (`digitize.working_page`). `gain_mm_mv=None` means 10 mm/mV
    unless the calibration pulse (1 mV by definition) stands 5 or 20 mm high on the grid: then its gain; a given
    gain is kept, and a pulse that disagrees with it is noted. The speed only says how long the rows are in
    seconds (the read itself puts each row on a 10-s axis). `ink`: the page's `trace_ink`, if already made."""
    gain = float(gain_mm_mv) if gain_mm_mv else 10.0
    ink = trace_ink(work_rgb) if ink is None else ink
    lines = grid_map(work_rgb)
    grid = grid_scale(work_rgb, lines)
    spans = row_spans(read)
    rows = [y for y, _, _ in spans]
    pitch = float(np.median(np.diff(rows))) if len(rows) > 1 else 0.25 * work_rgb.shape[0]
    pulse = find_pulse(ink, spans, pitch) if spans else None
    row_px = float(np.median([b - a for _, a, b in spans])) if spans else float(read.x_range[1] - read.x_range[0])
    notes: list[str] = []
    pulse_ppm = None
    if grid.px_per_mm is not None:
        ppm, ppm_y, source = grid.px_per_mm, grid.px_per_mm_y, "grid"
        if pulse is not None:
            height_mm = pulse.height_px / (ppm_y or ppm)
            pulse_ppm = pulse.px_per_mm(speed_mm_s, gain)
            width_ok = abs(pulse.width_px / ppm / (0.2 * speed_mm_s) - 1.0) <= 0.2  # 200 ms: a real pulse
            near = [g for g in AUTO_GAINS if abs(height_mm / g - 1.0) <= 0.1 and width_ok]
            if abs(height_mm / gain - 1.0) <= PULSE_AGREES:
                notes.append(f"calibration pulse confirms the grid: 1 mV = {height_mm:.1f} mm ({pulse.rows} rows)")
            elif gain_mm_mv is None and near:
                gain = near[0]
                notes.append(f"gain {gain:g} mm/mV from the calibration pulse ({height_mm:.1f} mm high on the grid)")
            else:
                notes.append(f"calibration pulse is {height_mm:.1f} mm high on the grid, expected {gain:g}: "
                             f"kept {gain:g} mm/mV")
    elif pulse is not None:
        by_width = pulse.width_px / (0.2 * speed_mm_s)  # 200 ms wide: px/mm if the speed is right
        near = [g for g in AUTO_GAINS if abs(pulse.height_px / by_width / g - 1.0) <= 0.1]
        if gain_mm_mv is None and near and near[0] != gain:
            gain = near[0]
            notes.append(f"gain {gain:g} mm/mV from the calibration pulse's height to width (200 ms at "
                         f"{speed_mm_s:g} mm/s)")
        ppm = pulse_ppm = pulse.px_per_mm(speed_mm_s, gain)
        ppm_y, source = None, "pulse"
        notes.append(f"no grid found: px/mm from the calibration pulse ({pulse.rows} rows, 1 mV = {gain:g} mm)")
    else:
        ppm, ppm_y, source = row_px / (T_SECONDS * speed_mm_s), None, "assumed"
        notes.append(f"no grid and no calibration pulse found: px/mm assumes the rows are {T_SECONDS:g} s at "
                     f"{speed_mm_s:g} mm/s; millivolts assume {gain:g} mm/mV")
    row_s = row_px / ppm / speed_mm_s
    if source != "assumed" and not 0.8 * T_SECONDS <= row_s <= 1.2 * T_SECONDS:
        notes.append(f"the rows span {row_s:.1f} s at {speed_mm_s:g} mm/s, not {T_SECONDS:g} s: the time axis "
                     "assumes 10 s per row; check the paper speed")
    for note in notes:
        log.debug(note)
    shifts = None
    if source == "grid":
        shifts = sample_shifts(lines, read.rows, read.boxes, ppm, grid.minor_seen, ppm * speed_mm_s, N_SAMPLES, FS)
    return Calibration(float(ppm), source, float(speed_mm_s), float(gain), grid, pulse, pulse_ppm,
                       None if ppm_y is None else float(ppm_y), float(row_s), notes, read.time_axis == "ticks", shifts)


def to_millivolts(read: Digitized, cal: Calibration, fs: float = 500.0) -> np.ndarray:
    """(T_SECONDS * fs, 12) float32 mV of a read, NaN where a lead was not printed (WFDB's missing value).

    Trace heights in working px (`read.raw_px` where the read keeps them, else the page-normalised signal times
    its divisor) over px per mV, resampled from the read's 100 Hz to `fs` (linear; a lead's gaps stay NaN)."""
    if read.raw_px is not None:
        px = np.asarray(read.raw_px, np.float64)
    else:
        px = np.where(read.mask, read.signal.astype(np.float64) * read.scale_px, np.nan)
    mv = px / cal.px_per_mv
    scale = cal.time_scale
    n_out = int(round(T_SECONDS * fs))
    t_in = np.arange(N_SAMPLES) / FS * scale  # where each read sample lies on the paper's time axis
    t_out = np.arange(n_out) / fs
    nearest = np.rint(t_out / scale * FS).astype(int)
    inside = nearest < N_SAMPLES  # a row shorter than 10 s leaves the last samples unread
    nearest = np.clip(nearest, 0, N_SAMPLES - 1)
    out = np.full((n_out, 12), np.nan, np.float32)
    for lead in range(12):
        valid = np.isfinite(mv[lead])
        if valid.sum() < 2:
            continue
        t_lead = t_in if cal.shifts is None else t_in - cal.shifts[lead]
        vals = np.interp(t_out, t_lead[valid], mv[lead][valid])
        out[:, lead] = np.where(valid[nearest] & inside, vals, np.nan)
    return out
