"""Paper-ECG page -> 12-lead traces on a common 10-second time axis (a classical digitiser, no learning).

Why: an image tower trained from scratch on 2 CPU cores never gets enough steps to learn to *read* thin
traces (fold-9 AUC stayed near 0.5), while a small 1-D network on the signals learns the superclasses in
a minute. So the page is turned back into signals first, the way the PhysioNet 2024 digitisers do, and
the encoder reads those. Every step uses what all printed ECGs share, never the renderer's metadata:

1. ink: darkness against the local paper level, on the *brightest* channel, so coloured grid lines
   (red, pink, green, blue) vanish and shading, glare and yellowed paper do not matter;
2. deskew: the rotation that makes the ink's row profile sharpest (traces and grid are horizontal);
3. grey grid lines (black grid, photocopies) removed as long straight horizontal/vertical strokes;
4. rows: heights where ink runs across most of the page; the largest evenly spaced set is the trace
   rows (header text, stamps and labels are not evenly spaced and do not run across the page); 3 rows
   -> 3x4, 4 -> 3x4 + rhythm strip, 6 -> 6x2, 12 -> 12x1 (the layouts clinics print);
5. per row, the trace is followed column by column (the ink run nearest to where it was), the
   calibration pulse is skipped, and each column's time window is placed on the 10-second axis.

Amplitudes come out in units of the page's own scale (baseline removed, divided by a robust page-wide
amplitude), so paper gain, dpi and camera distance do not matter; `canonicalize` applies the same
normalisation to real signals, which is what lets the trace encoder be pre-trained on WFDB signals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.errors import InputError
from rag_ecg.paper.layout import LEAD_ROWS
from rag_ecg.paper.orientation import row_skew

# One OpenCV thread (as in drawing.py): pages are digitised in the embedding process between forks of
# render workers, and an OpenCV thread pool alive at a fork deadlocks the children (seen: index build).
cv2.setNumThreads(1)

T_SECONDS = 10.0  # the canonical page: 10 s (one full row at 25 mm/s)
FS = 100.0  # canonical sampling rate, Hz
N_SAMPLES = int(T_SECONDS * FS)
WORK_WIDTH = 1600  # working resolution: page width in pixels (~5.4 px/mm on A4)
MAX_WORK_HEIGHT = 4 * WORK_WIDTH  # pages taller than 4:1 are refused: the working page stays <= 1600x6400
INK_ON = 110  # ink strength (0-255) that counts as a pen stroke
MIN_CONTINUITY = 0.6  # share of columns where a row's line must continue from the previous column
MAX_INK_DENSITY = 0.15  # share of a page's trace area that may be ink (pen lines: ~2-6 %)

LAYOUT_BY_ROWS = {3: "3x4", 4: "3x4+II", 6: "6x2", 12: "12x1"}
_LEAD_INDEX = {ld: i for i, ld in enumerate(STANDARD_LEADS)}


class DigitizeError(InputError):
    """No ECG trace rows could be found on the page (a blank page, a photo of something else)."""


@dataclass
class Digitized:
    """What was read off a page: (12, N_SAMPLES) traces and where each lead was printed."""

    signal: np.ndarray  # (12, N) float32, page-normalised amplitude, 0 where the lead was not printed
    mask: np.ndarray  # (12, N) bool, True where the lead was printed
    layout: str  # the layout read from the row count
    angle: float  # deskew rotation applied, degrees
    rows: list[float] = field(default_factory=list)  # trace row baselines, working-resolution pixels
    x_range: tuple[int, int] = (0, 0)  # median trace start and end column, working-resolution pixels
    turns: int = 0  # quarter turns (counter-clockwise) applied before reading: 1 or 3 = scanned sideways
    skew: float = 0.0  # median skewness of the rows' traces: > 0 when the QRS spikes point up (orientation)


# ---------------------------------------------------------------- public


def digitize(page: np.ndarray, rhythm_lead: str = "II") -> Digitized:
    """(H, W, 3) uint8 RGB page -> Digitized. Raises DigitizeError if no trace rows are found.

    A page scanned sideways is refused upright, then read both quarter turns (90°, 270°), keeping the read whose
    traces skew upward (`orientation.row_skew`). Upright pages are read exactly as before (one read), so a
    sideways page costs only pages that would have been refused; a page upside down is read as it lies."""
    if page.ndim != 3 or page.shape[2] != 3 or page.dtype != np.uint8:
        raise InputError(f"digitize expects an (H, W, 3) uint8 RGB page, got {page.dtype} {page.shape}")
    try:
        return _read(_resize(page), rhythm_lead, 0)
    except DigitizeError as exc:
        upright_error = exc  # its reason names what was wrong with the page as given
    reads = []
    for turns in (1, 3):
        try:
            reads.append(_read(_resize(_turn(page, turns)), rhythm_lead, turns))
        except DigitizeError:
            continue
    if not reads:
        raise upright_error
    return max(reads, key=lambda r: r.skew)


def _turn(page: np.ndarray, turns: int) -> np.ndarray:
    """The page turned `turns` quarter turns counter-clockwise (contiguous, as OpenCV wants it)."""
    return np.ascontiguousarray(np.rot90(page, turns % 4)) if turns % 4 else page


def _read(work: np.ndarray, rhythm_lead: str, turns: int) -> Digitized:
    """`digitize` of a page already turned the right way round (bar the deskew angle) and `_resize`d."""
    ink = ink_map(work)
    angle = deskew_angle(ink)
    if abs(angle) > 0.05:
        ink = _rotate(ink, angle)
    ink = remove_grid_lines(ink)
    rows, pitch = find_rows(ink)
    layout = LAYOUT_BY_ROWS[len(rows)]
    extents = trace_extent(ink, rows, pitch)
    x0, x1 = (int(np.median([e[i] for e in extents])) for i in (0, 1))
    _check_line_drawing(ink, rows, pitch, x0, x1)
    followed = [follow_trace(ink, y, pitch, a, b) for y, (a, b) in zip(rows, extents)]
    continuity = float(np.median([c for _, c in followed]))
    if continuity < MIN_CONTINUITY:
        raise DigitizeError(f"no readable ECG traces: the row lines are broken ({continuity:.0%} of columns continue "
                            "the line; pen traces are continuous)")
    rows_10s = [_resample(t, N_SAMPLES) for t, _ in followed]
    signal, mask = _lay_out(layout, rhythm_lead, lambda row, lead: rows_10s[row])
    skew = row_skew(signal, [[_LEAD_INDEX[ld] for ld in leads] for leads in _row_leads(layout, rhythm_lead)])
    return Digitized(signal, mask, layout, float(angle), [float(y) for y in rows], (int(x0), int(x1)),
                     turns % 4, skew)


def canonicalize(signal_mv: np.ndarray, fs: float, layout: str = "12x1", rhythm_lead: str = "II",
                 start_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A real (samples, 12) mV signal -> what `digitize` returns for it printed in `layout`.

    10 s from `start_s` at FS; each lead kept only in its column's time window (as on paper), the
    baseline removed the way the digitiser removes it, and the same page-wide normalisation.
    """
    sig = np.asarray(signal_mv, np.float64)
    if sig.ndim != 2 or sig.shape[1] != 12:
        raise InputError(f"canonicalize expects (samples, 12), got {sig.shape}")
    t = start_s + np.arange(N_SAMPLES) / FS
    src_t = np.arange(sig.shape[0]) / float(fs)
    full = np.stack([np.interp(t, src_t, sig[:, i]) for i in range(12)]).astype(np.float32)
    return _lay_out(layout, rhythm_lead, lambda row, lead: full[lead])


def _lay_out(layout: str, rhythm_lead: str, source) -> tuple[np.ndarray, np.ndarray]:
    """(page-normalised (12, N) traces, printed mask) of a layout; `source(row, lead index)` -> (N,) 10-s trace.

    Each printed column takes its time window from its source, baseline removed per column; a rhythm
    strip (the last row) overwrites its lead's column with the full 10 s. The one place both a read
    page (`digitize`) and a recorded signal (`canonicalize`) are put on the canonical axis.
    """
    signal = np.zeros((12, N_SAMPLES), np.float32)
    mask = np.zeros((12, N_SAMPLES), bool)
    for row, leads in enumerate(_row_leads(layout, rhythm_lead)):
        n = len(leads)
        for c, lead in enumerate(leads):
            a, b = c * N_SAMPLES // n, (c + 1) * N_SAMPLES // n
            li = _LEAD_INDEX[lead]
            signal[li, a:b] = detrend(source(row, li)[a:b])
            mask[li, a:b] = True
    return normalize(signal, mask), mask


def agreement(read: Digitized, truth: np.ndarray, truth_mask: np.ndarray, max_lag: int = 3) -> float:
    """How well a read follows the recorded signal (`canonicalize` of it in the page's layout): the mean over
    the leads the page prints of the correlation where both are printed, best within ±`max_lag` samples
    (±30 ms at FS) — a digitiser's time axis is good to a pixel or two, and one QRS sample off ruins a plain
    correlation. A printed lead the read misses (or overlaps by 50 samples or fewer) counts 0, so a read that
    keeps one clean lead scores below a full read: the score measures coverage as well as fidelity."""
    cors = []
    for lead in range(truth.shape[0]):
        printed = truth_mask[lead]
        if printed.sum() <= 50 or truth[lead][printed].std() == 0:
            continue  # the page does not print this lead: no read could follow it
        best = []
        for lag in range(-max_lag, max_lag + 1):
            sig, mask = np.roll(read.signal[lead], lag), np.roll(read.mask[lead], lag)
            m = mask & printed
            if m.sum() > 50 and truth[lead][m].std() > 0 and sig[m].std() > 0:
                best.append(np.corrcoef(truth[lead][m], sig[m])[0, 1])
        cors.append(max(best) if best else 0.0)
    return float(np.mean(cors)) if cors else 0.0


def detrend(segment: np.ndarray) -> np.ndarray:
    """Remove a segment's baseline: a robust straight line (a tilted photo tilts the whole row)."""
    n = segment.size
    if n < 4:
        return np.zeros(n, np.float32)
    half = n // 2
    a, b = float(np.median(segment[:half])), float(np.median(segment[half:]))
    t = np.arange(n, dtype=np.float32)
    line = a + (b - a) * (t - 0.5 * half) / max(1.0, 0.5 * n)
    return (segment - line).astype(np.float32)


def normalize(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Divide by the page's robust amplitude: the median over printed leads of their 2-98 % range."""
    spans = []
    for i in range(signal.shape[0]):
        seg = signal[i][mask[i]]
        if seg.size > 10:
            lo, hi = np.percentile(seg, [2, 98])
            spans.append(hi - lo)
    scale = float(np.median(spans)) if spans else 1.0
    out = signal / max(scale, 1e-6)
    out[~mask] = 0.0
    return np.clip(out, -8.0, 8.0).astype(np.float32)


# ---------------------------------------------------------------- steps


def _resize(page: np.ndarray) -> np.ndarray:
    """The page at WORK_WIDTH columns; refused (before any copy) when that would be over MAX_WORK_HEIGHT rows,
    so no input makes the digitiser hold more than a 1600x6400 working page (a 100x640,000 sliver: 49 GB)."""
    h, w = page.shape[:2]
    if w < 1 or h * WORK_WIDTH > MAX_WORK_HEIGHT * w:
        raise DigitizeError(f"page is {w}x{h} pixels, taller than {MAX_WORK_HEIGHT // WORK_WIDTH}:1: "
                            "not an ECG page the digitiser can read")
    if w == WORK_WIDTH:
        return page
    scale = WORK_WIDTH / w
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(page, (WORK_WIDTH, max(8, int(round(h * scale)))), interpolation=interp)


def ink_map(page: np.ndarray) -> np.ndarray:
    """(H, W) uint8 ink strength 0-255: how much darker than the local paper the brightest channel is.

    A coloured grid line is bright in at least one channel, a trace is dark in all of them; the local
    paper level (a grey closing over ~3 mm, then smoothed) cancels shadows, glare and paper tone. The
    strength is then stretched so the page's darkest strokes (the traces' cores) reach 255: grey grid
    lines, which are lighter than the pen, land below INK_ON.
    """
    r, g, b = cv2.split(page)
    bright = cv2.GaussianBlur(cv2.max(cv2.max(r, g), b), (3, 3), 0)
    k = max(9, int(round(page.shape[1] / 100)) | 1)
    paper = cv2.morphologyEx(bright, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    paper = cv2.blur(paper, (k, k))
    dark = cv2.divide(cv2.subtract(paper, bright), cv2.max(paper, 40), scale=255)  # uint8, saturating
    sample = dark[::2, ::2]
    core, texture = (float(v) for v in np.percentile(sample, [99.7, 90.0]))
    lo = max(0.3 * core, texture + 8.0)  # below: paper texture, noise, colour grid
    hi = max(lo + 32.0, 0.85 * core)  # above: a pen stroke for sure
    return cv2.multiply(cv2.subtract(dark, int(lo)), 1, scale=255.0 / (hi - lo))  # saturates at 0 and 255


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def deskew_angle(ink: np.ndarray, max_deg: float = 8.0) -> float:
    """Degrees to rotate so the ink's row profile is sharpest (coarse 0.5° search, then 0.1°)."""
    small = cv2.resize(ink.astype(np.float32), (400, max(8, int(round(ink.shape[0] * 400 / ink.shape[1])))),
                       interpolation=cv2.INTER_AREA)

    def score(a: float) -> float:
        prof = _rotate(small, a).sum(axis=1)
        return float(np.sum(np.diff(prof) ** 2))

    coarse = np.arange(-max_deg, max_deg + 1e-6, 0.5)
    best = float(coarse[int(np.argmax([score(a) for a in coarse]))])
    fine = np.arange(best - 0.4, best + 0.41, 0.1)
    return float(fine[int(np.argmax([score(a) for a in fine]))])


def remove_grid_lines(ink: np.ndarray) -> np.ndarray:
    """Subtract long straight horizontal and vertical strokes (grey grid lines; traces are never that straight),
    then specks (grid crossings, noise)."""
    h, w = ink.shape
    horiz = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 8), 1)))
    vert = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(3, h // 4))))
    out = cv2.subtract(ink, cv2.max(horiz, vert))
    # what is left of a grid where lines cross, and speckle noise, are specks: drop tiny blobs
    n, labels, stats, _ = cv2.connectedComponentsWithStats((out > INK_ON).astype(np.uint8), connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < max(6, (w // 320) ** 2)
    small[0] = False
    if small.any():
        out[small[labels]] = 0
    return out


def find_rows(ink: np.ndarray) -> tuple[list[float], float]:
    """Baselines (px) of the trace rows and their pitch; the largest evenly spaced set of across-page rows."""
    h, w = ink.shape
    on = (ink > INK_ON).astype(np.uint8)
    band = max(3, int(round(w / 130)))  # ~2.3 mm: a trace near its (possibly tilted) baseline stays within this
    near = cv2.dilate(on, cv2.getStructuringElement(cv2.MORPH_RECT, (1, 2 * band + 1)))
    cover = near[:, int(0.1 * w):int(0.9 * w)].mean(axis=1)
    cover = cv2.GaussianBlur(cover.reshape(-1, 1).astype(np.float32), (1, 0), sigmaX=0, sigmaY=band).ravel()
    min_gap = max(8, int(0.035 * h))
    peaks = [y for y in range(1, h - 1)
             if cover[y] >= 0.3 and cover[y] == cover[max(0, y - min_gap):y + min_gap + 1].max()]
    if len(peaks) < 3:
        raise DigitizeError(f"no readable ECG traces: found {len(peaks)} trace row(s) across the page "
                            "(an ECG page has 3, 4, 6 or 12)")
    best, best_key = None, None
    ys = np.asarray(peaks, np.float64)
    for i in range(len(ys)):
        for j in range(i + 1, len(ys)):
            pitch = ys[j] - ys[i]
            if pitch < min_gap:
                continue
            chain = [ys[i]]
            step = pitch  # follows a slowly changing pitch: a photo taken at an angle squeezes one end
            while len(chain) < 12:
                target = chain[-1] + step
                k = int(np.argmin(np.abs(ys - target)))
                if abs(ys[k] - target) > max(3.0, 0.12 * step) or ys[k] <= chain[-1]:
                    break
                step = 0.5 * step + 0.5 * (ys[k] - chain[-1])
                chain.append(ys[k])
            for n in sorted(LAYOUT_BY_ROWS, reverse=True):
                if len(chain) >= n:
                    rows = chain[:n]
                    key = (n, float(sum(cover[int(y)] for y in rows)))
                    if best_key is None or key > best_key:
                        best, best_key = rows, key
                    break
    if best is None:
        raise DigitizeError("no readable ECG traces: no evenly spaced set of 3, 4, 6 or 12 trace rows on the page")
    pitch = float(np.median(np.diff(best)))
    return [float(y) for y in best], pitch


def trace_extent(ink: np.ndarray, rows: list[float], pitch: float) -> list[tuple[int, int]]:
    """Per row, its first and last trace column (px), calibration pulse excluded.

    A row's trace is the longest run of inked columns (gaps under ~1.5 mm bridged): page edges, stamps
    and grid remnants beside it are not part of it. A printed calibration pulse ends a little before
    the trace starts: the first run of empty columns within the first 8 % of the row marks the
    trace's start. Rows are measured one by one because a photographed page is a trapezoid (rows
    start and end at different columns); a row much shorter than the others (a faded or clipped
    trace) takes the rows' median extent instead.
    """
    h, w = ink.shape
    half = max(2, int(0.45 * pitch))
    bridge = max(3, w // 180)
    found: list[tuple[int, int] | None] = []
    for y in rows:
        a, b = max(0, int(y) - half), min(h, int(y) + half + 1)
        cols = (ink[a:b] > INK_ON).any(axis=0)
        run = _longest_run(cv2.dilate(cols.astype(np.uint8).reshape(1, -1), np.ones((1, bridge), np.uint8)).ravel() > 0)
        if run is None:
            found.append(None)
            continue
        left, right = run[0] + bridge // 2, run[1] - bridge // 2
        window = cols[left:left + int(0.08 * (right - left))]
        gap = np.flatnonzero(~window)
        if gap.size:  # the trace starts where the first gap after the pulse ends
            after = np.flatnonzero(window[gap[0]:])
            if after.size:
                left += int(gap[0] + after[0])
        found.append((int(left), int(right)))
    good = [f for f in found if f is not None]
    if not good:
        raise DigitizeError("trace rows hold no ink")
    med = (int(np.median([f[0] for f in good])), int(np.median([f[1] for f in good])))
    length = med[1] - med[0]
    return [f if f is not None and f[1] - f[0] >= 0.85 * length else med for f in found]


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True, or None."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    if starts.size == 0:
        return None
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k])


def follow_trace(ink: np.ndarray, base: float, pitch: float, x0: int, x1: int) -> tuple[np.ndarray, float]:
    """(trace height above the baseline (px, up positive) at each column x0..x1 of one row, continuity).

    Per column the ink runs inside the row's band are found; the one nearest the previous point is the
    trace, and of that run the end farther from the previous point is taken (a run spans where the pen
    came from to where it went). A run farther than a quarter pitch away is a label, a neighbour's
    spike or a stamp, not this trace: such columns, and empty ones, carry the previous point.
    Continuity is the share of columns whose run touches the previous point (a pen line: ~1).
    """
    h, w = ink.shape
    top = max(0, int(round(base - 0.75 * pitch)))
    bot = min(h, int(round(base + 0.75 * pitch)) + 1)
    on = (ink[top:bot, x0:x1 + 1] > INK_ON).T.astype(np.int8)  # (columns, rows)
    n_cols = on.shape[0]
    padded = np.zeros((n_cols, on.shape[1] + 2), np.int8)
    padded[:, 1:-1] = on
    edges = np.diff(padded, axis=1)
    sc, sr = np.nonzero(edges == 1)  # row-major: sorted by column, then row
    ec, er = np.nonzero(edges == -1)
    bounds = np.searchsorted(sc, np.arange(n_cols + 1)).tolist()
    starts, ends = sr.tolist(), (er - 1).tolist()
    jump = 0.25 * pitch
    out = [0.0] * n_cols
    prev = float(base - top)
    locked = False
    touching = 0
    for x in range(n_cols):
        best, best_d = -1, (jump if locked else float(on.shape[1]))
        for k in range(bounds[x], bounds[x + 1]):
            s, e = starts[k], ends[k]
            d = s - prev if s > prev else (prev - e if e < prev else 0.0)
            if d <= best_d:
                best, best_d = k, d
        if best >= 0:
            touching += best_d <= 1.0
            locked = True
            s, e = starts[best], ends[best]
            if e - s <= 2:
                prev = 0.5 * (s + e)
            else:
                prev = float(s) if abs(s - prev) > abs(e - prev) else float(e)
        out[x] = prev
    return (base - top) - np.asarray(out, np.float32), touching / max(1, n_cols)  # up is positive, as on paper


def _check_line_drawing(ink: np.ndarray, rows: list[float], pitch: float, x0: int, x1: int) -> None:
    """Trace rows are thin lines on paper: a few per cent of their band is ink. A photo of something
    else (texture, noise, a dense picture) inks far more of it; refuse it rather than read noise."""
    top = max(0, int(rows[0] - 0.45 * pitch))
    bot = min(ink.shape[0], int(rows[-1] + 0.45 * pitch) + 1)
    density = float((ink[top:bot, x0:x1 + 1] > INK_ON).mean()) if x1 > x0 else 1.0
    if density > MAX_INK_DENSITY or x1 - x0 < 0.3 * ink.shape[1]:
        raise DigitizeError(f"no readable ECG traces: {density:.0%} of the trace area is ink, "
                            f"traces span {x1 - x0} of {ink.shape[1]} columns")


def _row_leads(layout: str, rhythm_lead: str) -> list[list[str]]:
    if layout == "3x4+II":
        return LEAD_ROWS["3x4"] + [[rhythm_lead]]
    return LEAD_ROWS[layout]


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    if x.size < 2:
        return np.zeros(n, np.float32)
    src = np.linspace(0.0, 1.0, x.size)
    dst = np.linspace(0.0, 1.0, n)
    return np.interp(dst, src, x).astype(np.float32)
