"""Drawing primitives for paper pages: the ECG grid, anti-aliased pen strokes and text, on uint8 RGB arrays.

Why this shape: pages are redrawn every epoch, so drawing must be cheap. The grid comes from exact 1-D line
coverages per axis: a small table of the distinct (row, column) kinds is blended once and gathered into the
page, cached per geometry. Traces are OpenCV anti-aliased polylines at 1/16 px precision (a pen of several
offset 1-px strokes). Text is Pillow's bundled FreeType font, rasterised once per string and blended with
numpy (same glyphs on every machine). The renderer and the artifacts (stamps, fax lines) both draw with these.
"""
from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One OpenCV thread: pages are drawn in parallel by processes (render jobs, index builds, DataLoader
# workers), and an OpenCV thread pool started before a fork deadlocks the forked children.
cv2.setNumThreads(1)

# (minor line, major line) RGB of each grid ink, as on commercial ECG paper.
GRID_INK: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((248, 196, 196), (232, 120, 120)),
    "pink": ((252, 214, 224), (238, 150, 178)),
    "green": ((198, 232, 198), (116, 186, 116)),
    "blue": ((200, 214, 245), (118, 148, 224)),
    "black": ((214, 214, 214), (140, 140, 140)),
}


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
def grid_page(size: tuple[int, int], grid_px: tuple[float, float, float, float], ppm: float, grid_color: str,
               paper: tuple[int, int, int], minor_w: float, major_w: float) -> np.ndarray:
    """(H, W, 3) uint8 paper with the 1 mm / 5 mm grid (read-only, cached: copy before drawing)."""
    w, h = size
    page = filled(h, w, paper)
    if grid_color != "none":
        minor_rgb, major_rgb = (np.asarray(c, np.float32) for c in GRID_INK[grid_color])
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


def decimate(x: np.ndarray, y: np.ndarray, per_px: float) -> tuple[np.ndarray, np.ndarray]:
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
def pen_offsets(width_px: float) -> np.ndarray:
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


def polyline(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, width_px: float) -> None:
    """Anti-aliased pen stroke through (xs, ys) px, drawn in place.

    Several offset 1-px anti-aliased strokes instead of one thick OpenCV stroke: about 3x faster, and the
    width is true to `width_px` (OpenCV's thick anti-aliased lines come out about a pixel wider).
    """
    base = np.empty((len(xs), 1, 2), np.int32)
    base[:, 0, 0] = np.round(np.asarray(xs) * 16.0)
    base[:, 0, 1] = np.round(np.asarray(ys) * 16.0)
    strokes = [base + off for off in pen_offsets(round(float(width_px), 3))]
    cv2.polylines(canvas, strokes, False, tuple(int(c) for c in color), 1, cv2.LINE_AA, 4)


# ---------------------------------------------------------------- text


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
