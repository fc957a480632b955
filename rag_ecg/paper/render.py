"""Paper-ECG rendering: a record (mV) -> a PIL image on real paper geometry, plus where each lead went.

Why this shape: the encoder is trained and queried on *pictures* of ECGs, so reference pages must look like
what clinics print (25 mm/s, 10 mm/mV, 1 mm / 5 mm grid to scale, calibration pulse, labels, header) and
must be cheap enough to redraw every epoch (about 50x faster than drawing the page with matplotlib, see
bench/render.py). The grid comes from exact 1-D line coverages per axis: a small table of the distinct
(row, column) kinds is blended once and gathered into the page, cached per geometry. Traces are OpenCV
anti-aliased polylines at 1/16 px precision (a pen of several offset 1-px strokes). Text is Pillow's
bundled FreeType font, rasterised once per string and blended with numpy (same glyphs on every machine).

Coordinates: pixels with (0, 0) at the top-left; a LeadBox is [x0, x1) x [y0, y1); times are seconds from
the start of the record; `px_per_mm = dpi / 25.4`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rag_ecg.data.records import ECGRecord, STANDARD_LEADS

# One OpenCV thread: pages are drawn in parallel by processes (render jobs, index builds, DataLoader
# workers), and an OpenCV thread pool started before a fork deadlocks the forked children.
cv2.setNumThreads(1)

LAYOUTS = ("3x4", "3x4+II", "6x2", "12x1")
GRID_COLORS = ("red", "pink", "green", "blue", "black", "none")
PAPERS: dict[str, tuple[float, float]] = {"a4": (297.0, 210.0), "letter": (279.4, 215.9)}  # landscape, mm

# (minor line, major line) RGB of each grid ink, as on commercial ECG paper.
_GRID_INK: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((248, 196, 196), (232, 120, 120)),
    "pink": ((252, 214, 224), (238, 150, 178)),
    "green": ((198, 232, 198), (116, 186, 116)),
    "blue": ((200, 214, 245), (118, 148, 224)),
    "black": ((214, 214, 214), (140, 140, 140)),
}

# Lead arrangement of each layout: rows of leads; each column is its own time window.
_ROWS: dict[str, list[list[str]]] = {
    "3x4": [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]],
    "6x2": [["I", "V1"], ["II", "V2"], ["III", "V3"], ["aVR", "V4"], ["aVL", "V5"], ["aVF", "V6"]],
    "12x1": [[ld] for ld in STANDARD_LEADS],
}
_ROWS["3x4+II"] = _ROWS["3x4"]

UNKNOWN = "---"  # what the header prints for a value that was not measured (never estimated)


@dataclass
class RenderConfig:
    """How a page is drawn; every field has a realistic default (a 12-lead A4 print, 3x4 + lead II strip)."""

    layout: str = "3x4+II"  # one of LAYOUTS
    dpi: int = 200  # output resolution (dots per inch)
    speed_mm_s: float = 25.0  # paper speed, mm per second (12.5 / 25 / 50 usual)
    gain_mm_mv: float = 10.0  # amplitude scale, mm per millivolt (5 / 10 / 20 usual)
    grid_color: str = "red"  # red|pink|green|blue|black|none (none: plain paper, as B&W prints)
    header: bool = True  # print the header (id, age, sex, rate, intervals, speed, gain)
    line_width_mm: float = 0.3  # trace pen width, mm
    paper: str = "a4"  # a4|letter, landscape
    margin_mm: float = 8.0  # blank paper around the grid, mm
    trace_mm: float = 250.0  # length of a full row of trace, mm (250 = 10 s at 25 mm/s; capped by the paper)
    minor_line_mm: float = 0.08  # width of the 1 mm grid lines, mm
    major_line_mm: float = 0.2  # width of the 5 mm grid lines, mm
    rhythm_lead: str = "II"  # lead of the bottom rhythm strip in "3x4+II"
    calibration: bool = True  # draw the 1 mV / 200 ms calibration pulse at the start of each row
    labels: bool = True  # print lead names
    separators: bool = True  # short vertical ticks where a row switches to the next column's lead
    clip_traces: bool = True  # keep each trace inside its lead box (as most printers clip)
    font_mm: float = 3.2  # height of label and header text, mm
    start_s: float | None = 0.0  # where the page starts in the record, s (None: random from the seed)
    trace_color: tuple[int, int, int] = (0, 0, 0)  # RGB of traces and text
    paper_color: tuple[int, int, int] = (255, 255, 255)  # RGB of the paper

    def __post_init__(self) -> None:
        self.trace_color = tuple(int(c) for c in self.trace_color)
        self.paper_color = tuple(int(c) for c in self.paper_color)

    def validate(self) -> "RenderConfig":
        """Raise ValueError naming the field and the problem; return self when fine."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"RenderConfig.{name}: {why}")

        if self.layout not in LAYOUTS:
            bad("layout", f"{self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.grid_color not in GRID_COLORS:
            bad("grid_color", f"{self.grid_color!r} is not one of {', '.join(GRID_COLORS)}")
        if self.paper not in PAPERS:
            bad("paper", f"{self.paper!r} is not one of {', '.join(PAPERS)}")
        if not 25 <= self.dpi <= 1200:
            bad("dpi", f"{self.dpi} is outside 25-1200")
        if not 1.0 <= self.speed_mm_s <= 100.0:
            bad("speed_mm_s", f"{self.speed_mm_s} is outside 1-100 mm/s")
        if not 0.5 <= self.gain_mm_mv <= 100.0:
            bad("gain_mm_mv", f"{self.gain_mm_mv} is outside 0.5-100 mm/mV")
        if not 10.0 <= self.trace_mm <= 1000.0:
            bad("trace_mm", f"{self.trace_mm} is outside 10-1000 mm")
        if not 0.01 <= self.line_width_mm <= 2.0:
            bad("line_width_mm", f"{self.line_width_mm} is outside 0.01-2 mm")
        if self.rhythm_lead not in STANDARD_LEADS:
            bad("rhythm_lead", f"{self.rhythm_lead!r} is not a standard lead")
        if self.start_s is not None and self.start_s < 0:
            bad("start_s", f"{self.start_s} is negative")
        for name in ("trace_color", "paper_color"):
            v = getattr(self, name)
            if len(v) != 3 or not all(0 <= c <= 255 for c in v):
                bad(name, f"{v} is not an RGB triple of 0-255")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "RenderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RenderConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RenderConfig":
        import yaml

        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read render config ({exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: render config must be a mapping of field: value")
        return cls.from_dict(d)


@dataclass
class LeadBox:
    """Where one lead was drawn: px box [x0, x1) x [y0, y1), its time window (s) and 0 mV row (px)."""

    lead: str
    box: tuple[int, int, int, int]
    t_start: float
    t_end: float
    baseline_y: float = 0.0  # pixel row of 0 mV (sub-pixel)
    rhythm: bool = False  # True for the full-width rhythm strip


@dataclass
class RenderResult:
    """A rendered page and its layout (what a digitiser or a crop-per-lead model needs)."""

    image: Image.Image | None  # None only from render_array
    leads: list[LeadBox]
    config: RenderConfig
    px_per_mm: float
    calibration: list[tuple[int, int, int, int]] = field(default_factory=list)  # px boxes of the pulses
    grid_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # px box of the printed grid
    record_id: str = ""
    heart_rate: float | None = None  # bpm printed in the header (None: unknown)
    size: tuple[int, int] = (0, 0)  # page (width, height), px

    def layout_json(self) -> dict:
        """JSON-ready layout: image size, scales, and per lead its box, time window and baseline."""
        return {
            "record_id": self.record_id,
            "image_size": list(self.size),
            "dpi": self.config.dpi,
            "px_per_mm": self.px_per_mm,
            "speed_mm_s": self.config.speed_mm_s,
            "gain_mm_mv": self.config.gain_mm_mv,
            "px_per_s": self.px_per_mm * self.config.speed_mm_s,
            "px_per_mv": self.px_per_mm * self.config.gain_mm_mv,
            "layout": self.config.layout,
            "grid_box": list(self.grid_box),
            "calibration": [list(b) for b in self.calibration],
            "heart_rate": self.heart_rate,
            "leads": [{**asdict(b), "box": list(b.box)} for b in self.leads],
            "config": {**asdict(self.config), "trace_color": list(self.config.trace_color),
                       "paper_color": list(self.config.paper_color)},
        }

    def save(self, path: str | Path, layout: bool = True, **save_kwargs) -> Path:
        """Write the image (format from the suffix) and, if `layout`, `<stem>.json` beside it; atomically."""
        path = Path(path)
        atomic_save_image(self.image, path, **save_kwargs)
        if layout:
            atomic_write_text(path.with_suffix(".json"), json.dumps(self.layout_json(), indent=1))
        return path


# ---------------------------------------------------------------- atomic writes

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _publish(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_image(image: Image.Image, path: Path, **save_kwargs) -> None:
    """Save via a temp file in the same folder + os.replace: readers never see half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix (use .png, .jpg, .bmp, .tif or .webp)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **save_kwargs)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- heart rate


def detect_r_peaks(lead_mv: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of QRS complexes in one lead ((samples,) mV): slope energy, 150 ms refractory."""
    x = np.asarray(lead_mv, np.float64)
    if x.size < int(fs):
        return np.zeros(0, np.int64)
    slope = np.diff(x - np.median(x)) * fs  # mV/s
    win = max(1, int(round(0.10 * fs)))
    energy = np.convolve(slope * slope, np.ones(win) / win, mode="same")
    thr = 0.25 * np.percentile(energy, 99.5)
    if thr <= 0:
        return np.zeros(0, np.int64)
    above = np.flatnonzero(np.diff(np.r_[0, (energy > thr).astype(np.int8), 0]))
    starts, ends = above[0::2], above[1::2]
    peaks: list[int] = []
    refractory = int(0.25 * fs)
    dev = np.abs(x - np.median(x))
    for s, e in zip(starts, ends):
        seg = dev[s:e + 1]
        p = s + int(np.argmax(seg)) if seg.size else s
        if peaks and p - peaks[-1] < refractory:
            if abs(x[p]) > abs(x[peaks[-1]]):
                peaks[-1] = p
            continue
        peaks.append(p)
    return np.asarray(peaks, np.int64)


def estimate_heart_rate(lead_mv: np.ndarray, fs: float) -> float | None:
    """Ventricular rate (bpm) from the median R-R interval of one lead; None if under 3 beats or implausible."""
    peaks = detect_r_peaks(lead_mv, fs)
    if peaks.size < 3:
        return None
    rate = 60.0 * fs / float(np.median(np.diff(peaks)))
    return rate if 20.0 <= rate <= 300.0 else None


# ---------------------------------------------------------------- geometry


@dataclass
class _Row:
    baseline_mm: float
    top_mm: float
    bottom_mm: float
    leads: list[str]
    rhythm: bool = False


@dataclass
class _Geometry:
    ppm: float
    size: tuple[int, int]
    grid_mm: tuple[float, float, float, float]  # x0, y0, x1, y1
    trace_x0_mm: float
    page_s: float
    rows: list[_Row]


def _geometry(cfg: RenderConfig, duration_s: float) -> _Geometry:
    ppm = cfg.dpi / 25.4
    pw, ph = PAPERS[cfg.paper]
    header_mm = 4.2 * cfg.font_mm if cfg.header else 0.0
    gx0, gy0 = cfg.margin_mm, cfg.margin_mm + header_mm
    gw = math.floor((pw - 2 * cfg.margin_mm) / 5.0) * 5.0
    gh = math.floor((ph - gy0 - cfg.margin_mm) / 5.0) * 5.0
    if gw < 50 or gh < 50:
        raise ValueError(f"RenderConfig: margins/header leave only {gw:g} x {gh:g} mm of grid")
    cal_mm = math.ceil((0.2 * cfg.speed_mm_s + 4.0) / 5.0) * 5.0 if cfg.calibration else 0.0
    trace_x0 = gx0 + cal_mm
    page_s = min(duration_s, min(cfg.trace_mm, gx0 + gw - trace_x0) / cfg.speed_mm_s)
    leads_rows = [list(r) for r in _ROWS[cfg.layout]]
    n = len(leads_rows) + (1 if cfg.layout == "3x4+II" else 0)
    pitch = gh / n
    rows = [_Row(gy0 + pitch * (i + 0.55), gy0 + pitch * i, gy0 + pitch * (i + 1), leads)
            for i, leads in enumerate(leads_rows)]
    if cfg.layout == "3x4+II":
        i = n - 1
        rows.append(_Row(gy0 + pitch * (i + 0.55), gy0 + pitch * i, gy0 + pitch * (i + 1),
                         [cfg.rhythm_lead], rhythm=True))
    size = (int(round(pw * ppm)), int(round(ph * ppm)))
    return _Geometry(ppm, size, (gx0, gy0, gx0 + gw, gy0 + gh), trace_x0, page_s, rows)


# ---------------------------------------------------------------- grid


def _line_coverage(n_px: int, start_px: float, stop_px: float, pitch_px: float, width_px: float) -> np.ndarray:
    """(n_px,) float32 in [0, 1]: share of each pixel covered by lines at start + k*pitch within [start, stop]."""
    width_px = max(width_px, 0.75)  # thinner than a pixel would print too faint to see
    centers = np.arange(n_px, dtype=np.float64) + 0.5
    k = np.clip(np.round((centers - start_px) / pitch_px), 0, math.floor((stop_px - start_px) / pitch_px + 1e-6))
    c = start_px + k * pitch_px
    lo = np.maximum(np.arange(n_px), c - width_px / 2)
    hi = np.minimum(np.arange(n_px) + 1.0, c + width_px / 2)
    return np.clip(hi - lo, 0.0, 1.0).astype(np.float32)


def filled(h: int, w: int, color) -> np.ndarray:
    """(h, w, 3) uint8 of one colour (one row built, then copied: ~15x faster than `a[:] = color`)."""
    row = np.empty((w, 3), np.uint8)
    row[:] = np.asarray(color, np.uint8)
    return np.broadcast_to(row, (h, w, 3)).copy()


@lru_cache(maxsize=4)
def _grid_page(size: tuple[int, int], grid_px: tuple[float, float, float, float], ppm: float, grid_color: str,
               paper: tuple[int, int, int], minor_w: float, major_w: float) -> np.ndarray:
    """(H, W, 3) uint8 paper with the 1 mm / 5 mm grid (read-only, cached: copy before drawing)."""
    w, h = size
    page = filled(h, w, paper)
    if grid_color != "none":
        minor_rgb, major_rgb = (np.asarray(c, np.float32) for c in _GRID_INK[grid_color])
        paper_rgb = np.asarray(paper, np.float32)
        x0, y0, x1, y1 = grid_px
        q = 32  # coverage quantised to 1/32: few distinct rows and columns, invisible difference

        def classes(n, a, b):
            """Per pixel along one axis: index of its (minor, major, inside) class; the classes' values."""
            minor = np.round(_line_coverage(n, a, b, ppm, minor_w) * q).astype(np.int64)
            major = np.round(_line_coverage(n, a, b, 5 * ppm, major_w) * q).astype(np.int64)
            inside = ((np.arange(n) + 1 > a - major_w) & (np.arange(n) < b + major_w)).astype(np.int64)
            keys, inverse = np.unique((minor * (q + 1) + major) * 2 + inside, return_inverse=True)
            ins = (keys % 2).astype(np.float32)
            return inverse.reshape(-1), ((keys // 2) // (q + 1)) / q * ins, ((keys // 2) % (q + 1)) / q * ins, ins

        cx, ax_min, ax_maj, in_x = classes(w, x0, x1)
        cy, ay_min, ay_maj, in_y = classes(h, y0, y1)
        # Table over (row class, column class): minor lines over paper, major lines over that; only
        # where both axes are inside the grid (lines stop at its edge).
        both = (in_y[:, None] * in_x[None, :])[:, :, None]
        a_min = (1 - (1 - ax_min[None, :]) * (1 - ay_min[:, None]))[:, :, None] * both
        a_maj = (1 - (1 - ax_maj[None, :]) * (1 - ay_maj[:, None]))[:, :, None] * both
        table = paper_rgb * (1 - a_min) + minor_rgb * a_min
        table = table * (1 - a_maj) + major_rgb * a_maj
        table = np.clip(np.round(table), 0, 255).astype(np.uint8)
        page = np.take(np.take(table, cx, axis=1), cy, axis=0)  # distinct rows (small), then whole rows
    page.setflags(write=False)
    return page


# ---------------------------------------------------------------- traces


def _decimate(x: np.ndarray, y: np.ndarray, per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep each pixel column's min and max (in time order) when samples are denser than pixels."""
    k = int(per_px)
    if k < 3 or x.size < 4 * k:
        return x, y
    n = (x.size // k) * k
    yb = y[:n].reshape(-1, k)
    i_min, i_max = yb.argmin(axis=1), yb.argmax(axis=1)
    first = np.minimum(i_min, i_max) + np.arange(0, n, k)
    second = np.maximum(i_min, i_max) + np.arange(0, n, k)
    idx = np.empty(2 * first.size, np.int64)
    idx[0::2], idx[1::2] = first, second
    idx = np.r_[0, idx, np.arange(n, x.size)]
    return x[idx], y[idx]


@lru_cache(maxsize=64)
def _pen_offsets(width_px: float) -> np.ndarray:
    """(k, 2) int32 offsets in 1/16 px whose 1-px anti-aliased strokes together make a pen `width_px` wide."""
    if width_px < 1.5:
        return np.zeros((1, 2), np.int32)
    r = (width_px - 1.0) / 2.0
    m = int(round(2 * r)) + 1
    offs = np.linspace(-r, r, m)
    out = {(0.0, 0.0)} | {(float(o), 0.0) for o in offs} | {(0.0, float(o)) for o in offs}
    if m >= 3:  # keep diagonal strokes as wide as straight ones
        d = r / math.sqrt(2.0)
        out |= {(sx * d, sy * d) for sx in (-1, 1) for sy in (-1, 1)}
    return np.round(np.array(sorted(out)) * 16.0).astype(np.int32)


def _polyline(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, width_px: float) -> None:
    """Anti-aliased pen stroke through (xs, ys) px, drawn in place.

    Several offset 1-px anti-aliased strokes instead of one thick OpenCV stroke: about 3x faster, and the
    width is true to `width_px` (OpenCV's thick anti-aliased lines come out about a pixel wider).
    """
    base = np.empty((len(xs), 1, 2), np.int32)
    base[:, 0, 0] = np.round(np.asarray(xs) * 16.0)
    base[:, 0, 1] = np.round(np.asarray(ys) * 16.0)
    strokes = [base + off for off in _pen_offsets(round(float(width_px), 3))]
    cv2.polylines(canvas, strokes, False, tuple(int(c) for c in color), 1, cv2.LINE_AA, 4)


@lru_cache(maxsize=16)
def font(size_px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font (identical on every machine: no system fonts involved)."""
    return ImageFont.load_default(size=max(6, int(size_px)))


@lru_cache(maxsize=512)
def text_mask(text: str, size_px: int) -> tuple[np.ndarray, int, int]:
    """(alpha (h, w) uint8, dx, dy): anti-aliased coverage of `text`, offset of its ink from the origin."""
    f = font(size_px)
    x0, y0, x1, y1 = f.getbbox(text)
    img = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(img).text((-x0, -y0), text, fill=255, font=f)
    mask = np.asarray(img)
    mask.setflags(write=False)
    return mask, x0, y0


@lru_cache(maxsize=512)
def _text_layers(text: str, size_px: int, color: tuple[int, int, int], opacity: float):
    """(1 - alpha, alpha * color) float32 layers of `text`, ready to blend, and the ink offset."""
    mask, dx, dy = text_mask(text, size_px)
    a = mask[:, :, None].astype(np.float32) * (opacity / 255.0)
    return 1.0 - a, a * np.asarray(color, np.float32), dx, dy


def draw_text(canvas: np.ndarray, text: str, xy: tuple[float, float], size_px: int, color,
              opacity: float = 1.0) -> None:
    """Blend `text` into an (H, W, 3) uint8 canvas in place, top-left of its line box at `xy` (px)."""
    keep, ink, dx, dy = _text_layers(text, int(size_px), tuple(int(c) for c in color), float(opacity))
    x, y = int(round(xy[0])) + dx, int(round(xy[1])) + dy
    h, w = canvas.shape[:2]
    xa, ya, xb, yb = max(0, x), max(0, y), min(w, x + keep.shape[1]), min(h, y + keep.shape[0])
    if xa >= xb or ya >= yb:
        return
    region = canvas[ya:yb, xa:xb]
    sl = (slice(ya - y, yb - y), slice(xa - x, xb - x))
    region[:] = (region * keep[sl] + ink[sl] + 0.5).astype(np.uint8)


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return UNKNOWN + (f" {unit}" if unit else "")
    return f"{v:.0f}{' ' + unit if unit else ''}"


def header_lines(record: ECGRecord, cfg: RenderConfig, heart_rate: float | None) -> list[str]:
    """The printed header: what is known about the record; intervals only when supplied, never invented."""
    iv = record.extra.get("intervals") or {}
    sex = {"M": "Male", "F": "Female"}.get(record.sex or "", UNKNOWN)
    age = f"{record.age:.0f} yr" if record.age is not None else UNKNOWN
    qt = f"{_fmt(iv.get('qt_ms'))}/{_fmt(iv.get('qtc_ms'))} ms"
    return [
        f"ID: {record.record_id}     Age: {age}     Sex: {sex}",
        f"Vent. rate: {_fmt(heart_rate, 'bpm')}     PR: {_fmt(iv.get('pr_ms'), 'ms')}     "
        f"QRS: {_fmt(iv.get('qrs_ms'), 'ms')}     QT/QTc: {qt}",
        f"{cfg.speed_mm_s:g} mm/s     {cfg.gain_mm_mv:g} mm/mV     {record.fs:g} Hz     12-lead ({cfg.layout})",
    ]


def render_record(record: ECGRecord, config: RenderConfig | None = None, seed: int = 0) -> RenderResult:
    """Draw one record on ECG paper. Signal from `record.signal_mv()` ((samples, 12) mV); no artifacts.

    The seed only matters with `config.start_s=None` (random page start within a longer record).
    """
    canvas, result = render_array(record, config, seed)
    result.image = Image.fromarray(canvas, "RGB")
    return result


def render_array(record: ECGRecord, config: RenderConfig | None = None,
                 seed: int = 0) -> tuple[np.ndarray, RenderResult]:
    """`render_record` without the PIL wrap: the page as (H, W, 3) uint8 RGB (result.image is None)."""
    cfg = (config or RenderConfig()).validate()
    sig = record.signal_mv()
    fs = float(record.fs)
    lead_ix = {ld: record.leads.index(ld) for ld in STANDARD_LEADS}
    geo = _geometry(cfg, record.duration_s)
    ppm = geo.ppm
    if cfg.start_s is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]))
        start = float(rng.uniform(0.0, max(0.0, record.duration_s - geo.page_s)))
    else:
        start = min(cfg.start_s, max(0.0, record.duration_s - geo.page_s))
    start = math.floor(start * fs) / fs

    gx0, gy0, gx1, gy1 = geo.grid_mm
    canvas = np.array(_grid_page(geo.size, (gx0 * ppm, gy0 * ppm, gx1 * ppm, gy1 * ppm), ppm, cfg.grid_color,
                                 cfg.paper_color, cfg.minor_line_mm * ppm, cfg.major_line_mm * ppm))
    thick = max(1.0, cfg.line_width_mm * ppm)  # pen width, px
    half = thick / 2.0
    px_per_s, px_per_mv = cfg.speed_mm_s * ppm, cfg.gain_mm_mv * ppm
    color = cfg.trace_color
    boxes: list[LeadBox] = []
    cal_boxes: list[tuple[int, int, int, int]] = []
    font_px = int(round(cfg.font_mm * ppm))

    for row in geo.rows:
        base = row.baseline_mm * ppm
        y_top, y_bot = row.top_mm * ppm, row.bottom_mm * ppm
        if cfg.calibration:
            xa = gx0 + 1.0
            xs = np.array([xa, xa + 1.0, xa + 1.0, xa + 1.0 + 0.2 * cfg.speed_mm_s,
                           xa + 1.0 + 0.2 * cfg.speed_mm_s, geo.trace_x0_mm - 1.0]) * ppm
            ys = np.array([0, 0, 1, 1, 0, 0], np.float64) * -px_per_mv + base
            _polyline(canvas, xs, ys, color, thick)
            cal_boxes.append((int(math.floor(xs[0] - half)) - 1, int(math.floor(base - px_per_mv - half)) - 1,
                              int(math.ceil(xs[-1] + half)) + 2, int(math.ceil(base + half)) + 2))
        n_cols = len(row.leads)
        col_s = geo.page_s / n_cols
        for c, lead in enumerate(row.leads):
            t0 = start + c * col_s
            t1 = t0 + col_s
            bx0 = geo.trace_x0_mm * ppm + c * col_s * px_per_s
            box = (int(round(bx0)), int(round(y_top)),  # rounded: neighbouring boxes share an edge, never overlap
                   int(round(bx0 + col_s * px_per_s)), int(round(y_bot)))
            i0 = int(round(t0 * fs))
            i1 = min(sig.shape[0], int(round(t1 * fs)) + (1 if c == n_cols - 1 else 0))
            i1 = max(i1, i0 + 2)
            xs = bx0 + (np.arange(i0, i1) / fs - t0) * px_per_s
            ys = base - sig[i0:i1, lead_ix[lead]].astype(np.float64) * px_per_mv
            xs, ys = _decimate(xs, ys, fs / px_per_s)
            if cfg.clip_traces:  # anti-aliasing spills about a pixel past the pen: keep that inside too
                ys = np.clip(ys, box[1] + half + 1, box[3] - 2 - half)
            xs = np.clip(xs, box[0] + half + 1, box[2] - 2 - half)
            _polyline(canvas, xs, ys, color, thick)
            if cfg.separators and c > 0:
                tick = 2.5 * ppm
                _polyline(canvas, np.array([bx0, bx0]), np.array([base - tick, base + tick]), color, thick)
            boxes.append(LeadBox(lead, box, round(t0, 6), round(t1, 6), float(base), row.rhythm))
            if cfg.labels:
                draw_text(canvas, lead, (bx0 + 1.0 * ppm, y_top + 0.8 * ppm), font_px, color)

    heart_rate = None
    if cfg.header:
        heart_rate = record.extra.get("heart_rate") or estimate_heart_rate(sig[:, lead_ix["II"]], fs)
        for i, text in enumerate(header_lines(record, cfg, heart_rate)):
            draw_text(canvas, text, (cfg.margin_mm * ppm, (cfg.margin_mm + i * 1.35 * cfg.font_mm) * ppm),
                      font_px, color)
    result = RenderResult(image=None, leads=boxes, config=cfg, px_per_mm=ppm, calibration=cal_boxes,
                          grid_box=(int(round(gx0 * ppm)), int(round(gy0 * ppm)), int(round(gx1 * ppm)),
                                    int(round(gy1 * ppm))),
                          record_id=record.record_id, heart_rate=heart_rate, size=geo.size)
    return canvas, result


# ---------------------------------------------------------------- random configs and the one-call page


def _pick(rng: np.random.Generator, options: dict):
    keys = list(options)
    p = np.asarray(list(options.values()), np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def random_config(rng: np.random.Generator, dpi: int = 200) -> RenderConfig:
    """A realistic random page: the layouts, speeds, gains, grid inks and pens that clinics print."""
    layout = _pick(rng, {"3x4+II": 0.45, "3x4": 0.2, "6x2": 0.2, "12x1": 0.15})
    gains = {10.0: 0.75, 5.0: 0.2, 20.0: 0.05} if layout in ("3x4+II", "3x4") else {10.0: 0.45, 5.0: 0.55}
    ink = _pick(rng, {"red": 0.4, "pink": 0.2, "green": 0.1, "blue": 0.1, "black": 0.1, "none": 0.1})
    tint = rng.integers(0, 12, 3) if rng.random() < 0.5 else np.zeros(3, np.int64)
    trace = (0, 0, 0) if rng.random() < 0.8 else tuple(int(c) for c in rng.integers(0, 60, 3))
    return RenderConfig(
        layout=layout, dpi=dpi,
        speed_mm_s=_pick(rng, {25.0: 0.88, 50.0: 0.08, 12.5: 0.04}),
        gain_mm_mv=_pick(rng, gains),
        grid_color=ink,
        header=bool(rng.random() < 0.75),
        line_width_mm=float(np.round(rng.uniform(0.18, 0.45), 3)),
        paper=_pick(rng, {"a4": 0.6, "letter": 0.4}),
        margin_mm=float(np.round(rng.uniform(5.0, 12.0), 1)),
        rhythm_lead=_pick(rng, {"II": 0.85, "V1": 0.1, "V5": 0.05}),
        calibration=bool(rng.random() < 0.9),
        labels=bool(rng.random() < 0.97),
        separators=bool(rng.random() < 0.7),
        font_mm=float(np.round(rng.uniform(2.6, 3.8), 2)),
        start_s=None,
        trace_color=trace,
        paper_color=tuple(int(255 - t) for t in tint),
    )


def render_page(record: ECGRecord, preset: str = "clean", seed: int = 0, config: RenderConfig | None = None,
                dpi: int = 200) -> Image.Image:
    """Render + artifacts in one call (what training and indexing call per case).

    `config=None` draws the default page at `dpi`, or a random page (`random_config`) for preset "random";
    a given config is used as is (its own dpi). Same (record, preset, seed, config) -> same pixels.
    """
    return render_page_and_layout(record, preset, seed, config, dpi)[0]


def render_page_and_layout(record: ECGRecord, preset: str = "clean", seed: int = 0,
                           config: RenderConfig | None = None, dpi: int = 200) -> tuple[Image.Image, RenderResult]:
    """`render_page` plus the clean page's layout (boxes hold before geometric artifacts move things)."""
    from rag_ecg.paper.artifacts import PRESETS, apply_preset_array

    if preset not in PRESETS:
        raise ValueError(f"render preset {preset!r} is not one of {', '.join(PRESETS)}")
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xEC6])
    cfg_seed, render_seed, art_seed = (int(s) for s in ss.generate_state(3))
    if config is None:
        config = (random_config(np.random.default_rng(cfg_seed), dpi=dpi) if preset == "random"
                  else RenderConfig(dpi=dpi))
    canvas, result = render_array(record, config, seed=render_seed)
    result.image = Image.fromarray(apply_preset_array(canvas, preset, seed=art_seed), "RGB")
    return result.image, result
