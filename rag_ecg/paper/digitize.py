"""Paper-ECG page -> 12-lead traces on a common 10-second time axis (a classical digitiser, no learning).

Why: an image tower trained from scratch on 2 CPU cores never gets enough steps to learn to *read* thin
traces (fold-9 AUC stayed near 0.5), while a small 1-D network on the signals learns the superclasses in
a minute. So the page is turned back into signals first, the way the PhysioNet 2024 digitisers do, and
the encoder reads those. Every step uses what all printed ECGs share, never the renderer's metadata:

1. ink: darkness against the local paper level, on the *brightest* channel, so coloured grid lines
   (red, pink, green, blue) vanish and shading, glare and yellowed paper do not matter;
2. geometry: a page photographed at a slant is flattened (`perspective`: its lines' vanishing points), then
   deskewed: the rotation that makes the ink's row profile sharpest (traces and grid are horizontal);
3. grey grid lines (black grid, photocopies) removed as long straight horizontal/vertical strokes;
4. rows: heights where ink runs across most of the page; the largest evenly spaced set is the trace
   rows (header text, stamps and labels are not evenly spaced and do not run across the page); 3 rows
   -> 3x4, 4 -> 3x4 + a rhythm strip, 6 -> 6x2 or 3x4 + three strips, 7 -> 6x2 + a strip, 12 -> 12x1; each
   strip is named by the block's cell it repeats (`strips`), not by the row count or its printed label;
5. per row, the trace is followed column by column (the ink run nearest to where it was; a column's height
   is recovered from its ink run with the pen's width taken out, `rows`), the calibration pulse is skipped,
   and each column's time window is placed on the 10-second axis, to a fraction of a pixel by the ticks
   printed between leads where there are any (`time_axis`).

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
from rag_ecg.paper.ink import deskew_angle, ink_map, remove_grid_lines, rotate
from rag_ecg.paper.orientation import looks_sideways, row_skew
from rag_ecg.paper.perspective import Rectification, estimate, rectify
from rag_ecg.paper.row_read import read_layout
from rag_ecg.paper.rows import DigitizeError, row_sets
from rag_ecg.paper.segmenter import default_segmenter, trace_map
from rag_ecg.paper.strips import layout_rows

T_SECONDS = 10.0  # the canonical page: 10 s (one full row at 25 mm/s)
FS = 100.0  # canonical sampling rate, Hz
N_SAMPLES = int(T_SECONDS * FS)
WORK_WIDTH = 1600  # working resolution: page width in pixels (~5.4 px/mm on A4)
MAX_WORK_HEIGHT = 4 * WORK_WIDTH  # pages taller than 4:1 are refused: the working page stays <= 1600x6400
METHODS = ("auto", "classical", "learned")  # classical, learned where it fails | ink map + grid-line removal |
# the trace segmenter's map (paper/segmenter.py)
FAINT_CORE_PCT = 99.0  # ink percentile that sets full strength on a second read (default 99.7)
_LEAD_INDEX = {ld: i for i, ld in enumerate(STANDARD_LEADS)}


@dataclass
class Digitized:
    """What was read off a page: (12, N_SAMPLES) traces and where each lead was printed."""

    signal: np.ndarray  # (12, N) float32, page-normalised amplitude, 0 where the lead was not printed
    mask: np.ndarray  # (12, N) bool, True where the lead was printed
    layout: str  # the layout read: "3x4", "6x2", "12x1", "3x4+II" (a 3x4 block and a lead II strip), "3x4+V1/II/V5",
    # "6x2+V1"
    angle: float  # deskew rotation applied, degrees
    rows: list[float] = field(default_factory=list)  # trace row baselines, working-resolution pixels
    x_range: tuple[int, int] = (0, 0)  # median trace start and end column, working-resolution pixels
    turns: int = 0  # quarter turns (counter-clockwise) applied before reading: 1 or 3 = scanned sideways
    skew: float = 0.0  # median skewness of the rows' traces: > 0 when the QRS spikes point up (orientation)
    scale_px: float = 1.0  # the page-normalisation divisor: signal * scale_px = trace height in working px
    work_scale: float = 1.0  # working px per picture px (the picture, turned `turns` times, resized by this)
    work_size: tuple[int, int] = (0, 0)  # (width, height) of the working page, before the deskew rotation
    boxes: list[tuple[str, tuple[float, float, float, float], float, float]] = field(default_factory=list)
    # per printed lead column: (lead, (x0, y0, x1, y1) working px of the deskewed page, t0 s, t1 s on the 10-s axis)
    raw_px: np.ndarray | None = None  # (12, N) float32 trace height above its row's baseline, working px, NaN where
    # not printed: no detrend, no normalisation (what a millivolt read divides by px/mm x gain)
    pulses: tuple[int, int] = (0, 0)  # rows starting with a pulse standing up, rows ending in one hanging down
    method: str = "classical"  # what read the page: "classical" (the ink map) or "learned" (the segmenter's map)
    homography: np.ndarray | None = None  # 3x3 perspective correction (paper/perspective.py): the resized, turned
    # picture's px -> the working page's px before the deskew rotation; None: the page was read as it lies
    resized_size: tuple[int, int] = (0, 0)  # (width, height) of the resized, turned picture (work_size if no
    # correction)
    row_px: list[np.ndarray] = field(default_factory=list)  # per printed row, its (N,) read over 10 s (working px
    # above its baseline): a lead printed twice (in the block and a strip) has its own read in each place
    time_axis: str = "extent"  # what placed the samples on the rows (`time_axis.row_axes`): "ticks" (the ticks
    # between leads, at k T / n of each row) or "extent" (a row's first and last inked columns span 10 s)

    @property
    def upside_down(self) -> bool:
        """Most rows end in a calibration pulse hanging down and none starts with one standing up."""
        return _most_rows(self.pulses[1], self.pulses[0], len(self.rows))

    @property
    def pulses_stand_up(self) -> bool:
        """Most rows start with a calibration pulse standing up and none ends in one hanging down."""
        return _most_rows(self.pulses[0], self.pulses[1], len(self.rows))

    @property
    def picture_scale(self) -> float:
        """Working px per picture px at the working page's centre: `work_scale`, times the flattening's own zoom
        there when the page was flattened (a picture's px/mm is the working page's over this)."""
        if self.homography is None:
            return self.work_scale
        back = np.linalg.inv(self.homography)  # working px -> resized picture px
        u, v, w = back @ np.array([self.work_size[0] / 2, self.work_size[1] / 2, 1.0])
        jac = (back[:2, :2] * w - np.outer([u, v], back[2, :2])) / w ** 2
        return self.work_scale / float(np.sqrt(abs(np.linalg.det(jac))))

    def picture_points(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) working-frame (deskewed, flattened, turned, resized) x, y -> the same points on the picture as
        given."""
        pts = np.asarray(xy, np.float64).reshape(-1, 2)
        w, h = self.work_size
        if abs(self.angle) > 0.05:  # undo the deskew rotation about the working page's centre
            inv = cv2.invertAffineTransform(cv2.getRotationMatrix2D((w / 2, h / 2), self.angle, 1.0))
            pts = pts @ inv[:, :2].T + inv[:, 2]
        if self.homography is not None and len(pts):  # undo the perspective correction
            pts = cv2.perspectiveTransform(pts[None], np.linalg.inv(self.homography))[0]
            w, h = self.resized_size
        x, y = pts[:, 0] / self.work_scale, pts[:, 1] / self.work_scale
        tw, th = w / self.work_scale, h / self.work_scale  # the turned picture's size
        for _ in range(self.turns % 4):  # undo one counter-clockwise quarter turn: (x, y) -> (W - 1 - y, x)
            x, y = (th - 1) - y, x
            tw, th = th, tw
        return np.stack([x, y], axis=1)


# ---------------------------------------------------------------- public


def digitize(page: np.ndarray, rhythm_lead: str = "II", method: str = "auto", flatten: bool = True) -> Digitized:
    """(H, W, 3) uint8 RGB page -> Digitized. Raises DigitizeError if no trace rows are found.

    Which way round (`orientation`): a page whose ink runs in columns rather than rows (`looks_sideways`) lies
    on its side and is read both quarter turns first; so is a page refused as given. Of the quarter-turn reads,
    the one whose calibration pulses stand up at the rows' starts wins, then the one whose traces skew upward.
    A page whose rows end in pulses hanging down lies upside down (`rows.pulse_sides`): read again turned 180°.
    An upright page costs one read. A page photographed at a slant is flattened first (`perspective`; `flatten`
    False: read as it lies). A rhythm strip is named by the block cell it repeats (`strips`); `rhythm_lead` names a
    lone strip that repeats none clearly."""
    if method not in METHODS:
        raise InputError(f"digitize method {method!r} is not one of {', '.join(METHODS)}")
    if page.ndim != 3 or page.shape[2] != 3 or page.dtype != np.uint8:
        raise InputError(f"digitize expects an (H, W, 3) uint8 RGB page, got {page.dtype} {page.shape}")
    work, work_scale = _resize(page)
    sideways_first = looks_sideways(ink_map(work))
    if sideways_first and (read := _on_its_side(page, rhythm_lead, method, flatten)) is not None:
        return read
    try:
        read = _read_flattened(page, rhythm_lead, 0, method, flatten, (work, work_scale))
        return _turned_over(page, read, rhythm_lead, method, flatten) if read.upside_down else read
    except DigitizeError as exc:
        upright_error = exc  # its reason names what was wrong with the page as given
    read = None if sideways_first else _on_its_side(page, rhythm_lead, method, flatten)
    if read is None:
        raise upright_error
    return read


def _on_its_side(page: np.ndarray, rhythm_lead: str, method: str, flatten: bool) -> Digitized | None:
    """The better of the page's reads turned 90° and 270°, or None: the one with more rows starting in a pulse
    standing up than ending in one hanging down (the two reads are the same page 180° apart), then upward skew."""
    reads = []
    for turns in (1, 3):
        try:
            reads.append(_read_flattened(_turn(page, turns), rhythm_lead, turns, method, flatten))
        except DigitizeError:
            continue
    return max(reads, key=lambda r: (r.pulses[0] - r.pulses[1], r.skew), default=None)


def working_page(page: np.ndarray, read: Digitized) -> np.ndarray:
    """The RGB page in `read`'s working frame (turned, resized, flattened, deskewed; white where the warps uncover
    nothing), so later steps (calibration, overlays) measure in the pixels `read`'s rows and boxes are in."""
    work, _ = _resize(_turn(page, read.turns))
    if read.homography is not None:
        work = rectify(work, Rectification(read.homography, read.work_size))
    if abs(read.angle) > 0.05:
        h, w = work.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), read.angle, 1.0)
        work = cv2.warpAffine(work, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(255, 255, 255))
    return work


def _turned_over(page: np.ndarray, read: Digitized, rhythm_lead: str, method: str, flatten: bool) -> Digitized:
    """The read of a page lying upside down (`rows.pulse_sides`), turned 180°; the read as given if the turned
    page does not read, or its pulses do not then stand up at the rows' starts."""
    try:
        turned = _read_flattened(_turn(page, 2), rhythm_lead, 2, method, flatten)
    except DigitizeError:
        return read
    return turned if turned.pulses_stand_up else read


def _most_rows(count: int, against: int, rows: int) -> bool:
    """`count` rows show the cue (at least two, at least half the rows) and none shows the opposite one."""
    return against == 0 and count >= max(2, (rows + 1) // 2)


def _turn(page: np.ndarray, turns: int) -> np.ndarray:
    """The page turned `turns` quarter turns counter-clockwise (contiguous, as OpenCV wants it)."""
    return np.ascontiguousarray(np.rot90(page, turns % 4)) if turns % 4 else page


def _read_flattened(turned: np.ndarray, rhythm_lead: str, turns: int, method: str, flatten: bool = True,
                    resized: tuple[np.ndarray, float] | None = None) -> Digitized:
    """`_read_either_contrast` of a page turned `turns` quarter turns (`resized`: its `_resize`, if made), flattened
    when it shows a perspective (`perspective.estimate`); read as it lies when it shows none (a scan, a rendering:
    exactly as without the step), when the flattened page does not read, or without `flatten`."""
    work, work_scale = resized or _resize(turned)
    rect = estimate(work) if flatten else None
    if rect is not None:
        try:
            read = _read_either_contrast(rectify(work, rect), work_scale, rhythm_lead, turns, method)
            read.homography, read.resized_size = rect.matrix, (work.shape[1], work.shape[0])
            return read
        except DigitizeError:
            pass
    read = _read_either_contrast(work, work_scale, rhythm_lead, turns, method)
    read.resized_size = read.work_size
    return read


def _read_either_contrast(work: np.ndarray, work_scale: float, rhythm_lead: str, turns: int,
                          method: str) -> Digitized:
    """`_read` by `method`. Classical: again with the ink scale set by fainter strokes if that finds no trace rows
    (on thin-pen printouts the labels and lead ticks are far darker than the traces, which fall below INK_ON).
    Auto: classical as that, then the learned segmenter's map (it follows some hard photos the ink map loses,
    while the ink map reads other renderers' pages better: bench/digitize.py). The first failure's reason is
    the one reported."""
    if method == "learned":
        return _read(work, work_scale, rhythm_lead, turns, "learned")
    try:
        return _read(work, work_scale, rhythm_lead, turns, "classical")
    except DigitizeError as exc:
        first = exc
    fallbacks = [("classical", FAINT_CORE_PCT)]
    if method == "auto" and default_segmenter() is not None:
        fallbacks.append(("learned", 99.7))
    for how, core_pct in fallbacks:
        try:
            return _read(work, work_scale, rhythm_lead, turns, how, core_pct=core_pct)
        except DigitizeError:
            continue
    raise first from None


def _read(work: np.ndarray, work_scale: float, rhythm_lead: str, turns: int, method: str,
          core_pct: float = 99.7) -> Digitized:
    """`digitize` of a page already turned the right way round (bar the deskew angle) and `_resize`d."""
    learned = method == "learned"
    ink = trace_map(work) if learned else ink_map(work, core_pct)
    angle = deskew_angle(ink)
    if abs(angle) > 0.05:
        ink = rotate(ink, angle)
    if not learned:  # the segmenter marks traces only
        ink = remove_grid_lines(ink)
    read = read_layout(ink, row_sets(ink), rhythm_lead, N_SAMPLES)
    layout, rows, pitch, axes, ticked = read.layout, read.rows, read.pitch, read.axes, read.ticked
    x0, x1 = (int(np.median([e[i] for e in read.extents])) for i in (0, 1))
    up, down = read.pulses
    row_leads, rows_10s = layout_rows(layout), read.traces
    signal, mask, scale = _lay_out(layout, "II", lambda row, lead: rows_10s[row])
    skew = row_skew(signal, [[_LEAD_INDEX[ld] for ld in leads] for leads in row_leads])
    raw = np.full(signal.shape, np.nan, np.float32)
    boxes = []
    for row, leads in enumerate(row_leads):  # each printed column: its raw heights and where it sits
        (start, step), n = axes[row], len(leads)
        for c, lead in enumerate(leads):
            s, e = c * N_SAMPLES // n, (c + 1) * N_SAMPLES // n
            raw[_LEAD_INDEX[lead], s:e] = rows_10s[row][s:e]
            boxes.append((lead, (start + step * s, rows[row] - 0.5 * pitch, start + step * N_SAMPLES * (c + 1) / n,
                                 rows[row] + 0.5 * pitch), T_SECONDS * c / n, T_SECONDS * (c + 1) / n))
    return Digitized(signal, mask, layout, float(angle), [float(y) for y in rows], (int(x0), int(x1)),
                     turns % 4, skew, scale, work_scale, (work.shape[1], work.shape[0]), boxes, raw, (up, down), method,
                     row_px=[np.asarray(t, np.float32) for t in rows_10s], time_axis="ticks" if ticked else "extent")


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
    return _lay_out(layout, rhythm_lead, lambda row, lead: full[lead])[:2]


def _lay_out(layout: str, rhythm_lead: str, source) -> tuple[np.ndarray, np.ndarray, float]:
    """(page-normalised (12, N) traces, printed mask, the normalisation divisor) of a layout; `source(row, lead index)` -> (N,) 10-s trace.

    Each printed column takes its time window from its source, baseline removed per column; a rhythm
    strip (the last row) overwrites its lead's column with the full 10 s. The one place both a read
    page (`digitize`) and a recorded signal (`canonicalize`) are put on the canonical axis.
    """
    signal = np.zeros((12, N_SAMPLES), np.float32)
    mask = np.zeros((12, N_SAMPLES), bool)
    for row, leads in enumerate(layout_rows(layout, rhythm_lead)):
        n = len(leads)
        for c, lead in enumerate(leads):
            a, b = c * N_SAMPLES // n, (c + 1) * N_SAMPLES // n
            li = _LEAD_INDEX[lead]
            signal[li, a:b] = detrend(source(row, li)[a:b])
            mask[li, a:b] = True
    scale = page_scale(signal, mask)
    return normalize(signal, mask, scale), mask, scale


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


def page_scale(signal: np.ndarray, mask: np.ndarray) -> float:
    """The page's robust amplitude: the median over printed leads of their 2-98 % range."""
    spans = []
    for i in range(signal.shape[0]):
        seg = signal[i][mask[i]]
        if seg.size > 10:
            lo, hi = np.percentile(seg, [2, 98])
            spans.append(hi - lo)
    return max(float(np.median(spans)) if spans else 1.0, 1e-6)


def normalize(signal: np.ndarray, mask: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Divide by the page's robust amplitude (`page_scale`), so paper gain, dpi and camera distance drop out."""
    scale = page_scale(signal, mask) if scale is None else scale
    out = signal / scale
    out[~mask] = 0.0
    return np.clip(out, -8.0, 8.0).astype(np.float32)


def _resize(page: np.ndarray) -> tuple[np.ndarray, float]:
    """The page at WORK_WIDTH columns; refused (before any copy) when that would be over MAX_WORK_HEIGHT rows,
    so no input makes the digitiser hold more than a 1600x6400 working page (a 100x640,000 sliver: 49 GB)."""
    h, w = page.shape[:2]
    if w < 1 or h * WORK_WIDTH > MAX_WORK_HEIGHT * w:
        raise DigitizeError(f"page is {w}x{h} pixels, taller than {MAX_WORK_HEIGHT // WORK_WIDTH}:1: "
                            "not an ECG page the digitiser can read")
    if w == WORK_WIDTH:
        return page, 1.0
    scale = WORK_WIDTH / w
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    k = int(round(1.0 / scale))
    if k >= 2:  # a minimum filter first: averaging alone fades a 1-px pen line (and its QRS spikes) below INK_ON
        page = cv2.erode(page, np.ones((k, k), np.uint8))
    return cv2.resize(page, (WORK_WIDTH, max(8, int(round(h * scale)))), interpolation=interp), scale
