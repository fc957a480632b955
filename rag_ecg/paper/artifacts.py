"""Print / scan / photo artifacts for rendered ECG pages, one pure function each (`presets` composes them).

Why: users bring crooked phone photos, faded photocopies and re-compressed scans; the encoder must see such
pages in training and the index must be tested against them. Each artifact is a pure function
`fn(image, strength, seed) -> image`: `strength` in [0, 1] (0 = unchanged), same (image, strength, seed) ->
same pixels.

Size contract: every artifact returns an RGB image of exactly the input's size. Geometric
artifacts (rotation, perspective, crop) move the page inside that canvas and fill what is uncovered with a
background (scanner lid, desk); nothing is ever resized to a new shape.

Parameters scale with the page (`_scale`: 1.0 for an A4 page at 200 dpi), so a preset looks alike at 100 and
300 dpi. Internally everything works on (H, W, 3) uint8 RGB arrays with OpenCV; the PIL functions in
`ARTIFACTS` wrap those.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from rag_ecg.errors import InputError
from rag_ecg.paper.drawing import draw_text, filled, text_mask

ArrayFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# Backgrounds a page is photographed or scanned on: scanner lid white/black, desk greys, wood, blue cloth.
_BACKGROUNDS = [(250, 250, 248), (30, 30, 32), (120, 120, 118), (176, 170, 160), (142, 104, 70),
                (92, 66, 44), (60, 74, 98), (205, 200, 190)]


def _scale(img: np.ndarray) -> float:
    return max(img.shape[0], img.shape[1]) / 2339.0


def artifact_rng(seed: int, salt: int = 0) -> np.random.Generator:
    """The generator an artifact (or a preset's choice of steps) draws from: same seed and salt, same draws."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xA27, salt]))


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int, out_factor: int = 4) -> np.ndarray:
    """(h, w) float32 smooth random field in about [-1, 1] with ~`cells` bumps across the long side."""
    long_side = max(h, w)
    gh, gw = max(2, round(cells * h / long_side) + 2), max(2, round(cells * w / long_side) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    mid = cv2.resize(coarse, (max(2, w // out_factor), max(2, h // out_factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(mid, (w, h), interpolation=cv2.INTER_LINEAR)


def _multiply(img: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """img (H, W, 3) uint8 x shade (h, w) float (1 = unchanged; resized to the image if coarser), saturating.

    The shade goes through 1/128 fixed point (steps under one grey level at most paper tones): fast in OpenCV.
    """
    h, w = img.shape[:2]
    q = np.clip(shade * 128.0 + 0.5, 0, 255).astype(np.uint8)
    if q.shape != (h, w):
        q = cv2.resize(q, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.multiply(img, cv2.merge([q, q, q]), scale=1.0 / 128.0)


def _filter_fast(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """filter2D; kernels wider than 5 px run at half resolution (the result is blurred anyway)."""
    if kernel.shape[0] <= 5:
        return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    k = cv2.resize(kernel, (max(1, kernel.shape[1] // 2) | 1, max(1, kernel.shape[0] // 2) | 1),
                   interpolation=cv2.INTER_AREA)
    small = cv2.filter2D(small, -1, k / max(float(k.sum()), 1e-9), borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """(512, 512) float32 standard normal noise, fixed; pages take it at random offsets (cheap, seeded)."""
    return np.random.default_rng(0x0015E).standard_normal((512, 512)).astype(np.float32)


def _noise_tile_for(rng: np.random.Generator) -> np.ndarray:
    """The fixed tile, randomly rolled, transposed and flipped: (512, 512) float32 ~N(0, 1)."""
    t = _noise_tile()
    t = np.roll(t, (int(rng.integers(512)), int(rng.integers(512))), axis=(0, 1))
    if rng.random() < 0.5:
        t = t.T
    if rng.random() < 0.5:
        t = t[::-1]
    return np.ascontiguousarray(t)


def _add_noise(img: np.ndarray, tiles: list[np.ndarray]) -> np.ndarray:
    """img + per-channel noise tiles (grey levels, repeated over the page), saturating, all in uint8."""
    h, w = img.shape[:2]
    reps = (h // 512 + 1, w // 512 + 1)
    pos, neg = [], []
    for t in tiles:
        q = np.round(t).astype(np.int16)
        pos.append(np.tile(np.clip(q, 0, 255).astype(np.uint8), reps)[:h, :w])
        neg.append(np.tile(np.clip(-q, 0, 255).astype(np.uint8), reps)[:h, :w])
    return cv2.subtract(cv2.add(img, cv2.merge(pos)), cv2.merge(neg))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    c = np.asarray(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))], np.float64)
    return tuple(int(v) for v in np.clip(c + rng.normal(0, 8, 3), 0, 255))


# ---------------------------------------------------------------- geometry


def _rotation(h: int, w: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    angle = float(rng.uniform(-1, 1)) * 6.0 * strength
    return cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)


def rotate(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate about the centre by up to ±6°·strength (a page laid crooked on a scanner)."""
    h, w = img.shape[:2]
    m = _rotation(h, w, strength, rng)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=_background(rng))


def _homography(h: int, w: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    inward = rng.uniform(0.01, 0.14, (4, 2)) * strength * np.float32([w, h])
    sign = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    shift = rng.normal(0, 0.02 * strength, 2) * np.float32([w, h])  # the page is rarely centred
    dst = (src + inward * sign + shift).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def perspective(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Phone-camera perspective: each corner moves inward by up to 14%·strength; desk shows around it."""
    h, w = img.shape[:2]
    m = _homography(h, w, strength, rng)
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=_background(rng))


def _placement(h: int, w: int, strength: float, rng: np.random.Generator):
    """crop_pad's draws, in order: the part kept (x0, y0, x1, y1), the fill, where the part lands (ox, oy)."""
    cut = rng.uniform(0, 0.15 * strength, 4) * np.array([w, h, w, h])
    x0, y0 = int(cut[0]), int(cut[1])
    x1, y1 = max(x0 + 1, w - int(cut[2])), max(y0 + 1, h - int(cut[3]))
    fill = _background(rng) if rng.random() < 0.6 else (255, 255, 255)
    ox = int(rng.integers(0, w - (x1 - x0) + 1))
    oy = int(rng.integers(0, h - (y1 - y0) + 1))
    return (x0, y0, x1, y1), fill, ox, oy


def _place(img: np.ndarray, box, out: np.ndarray, ox: int, oy: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    out[oy:oy + y1 - y0, ox:ox + x1 - x0] = img[y0:y1, x0:x1]
    return out


def crop_pad(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Cut up to 15%·strength off each side and shift the rest on a background of the same size."""
    h, w = img.shape[:2]
    box, fill, ox, oy = _placement(h, w, strength, rng)
    return _place(img, box, filled(h, w, fill), ox, oy)


# ---------------------------------------------------------------- paper


def _line_shade(h: int, w: int, rng: np.random.Generator, depth: float, width_px: float,
                fine_px: float) -> np.ndarray:
    """Shade (h, w) of one fold: a soft valley on one side, a lit ridge on the other, a fine dark core."""
    if rng.random() < 0.7:  # folds usually run across the page, at halves or thirds
        frac = float(rng.choice([1 / 3, 1 / 2, 2 / 3])) + rng.normal(0, 0.03)
        vertical = bool(rng.random() < 0.6)
        theta = (0.0 if vertical else math.pi / 2) + rng.normal(0, 0.03)
        px, py = (frac * w, rng.uniform(0, h)) if vertical else (rng.uniform(0, w), frac * h)
    else:
        theta, px, py = rng.uniform(0, math.pi), rng.uniform(0, w), rng.uniform(0, h)
    nx, ny = math.cos(theta), math.sin(theta)
    # Signed distance to the fold along its normal, evaluated by an affine warp of a 1-D profile (fast).
    span = int(math.hypot(w, h)) * 2 + 8
    d = np.arange(span, dtype=np.float32) - span / 2
    prof = (1.0 - depth * np.exp(-((d + width_px * 0.6) / width_px) ** 2)
            + 0.6 * depth * np.exp(-((d - width_px * 0.6) / width_px) ** 2)
            - 1.5 * depth * np.exp(-(d / fine_px) ** 2)).astype(np.float32)[None, :]
    prof = np.repeat(prof, 2, axis=0)
    m = np.float32([[nx, ny, -(nx * px + ny * py) + span / 2], [0, 0, 0.5]])
    return cv2.warpAffine(prof, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def creases(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """1-3 paper folds with shading (valley, lit ridge, fine dark crease line)."""
    h, w = img.shape[:2]
    s = _scale(img)
    shade = np.ones((h, w), np.float32)
    for _ in range(1 + int(rng.integers(0, 1 + round(2 * strength)))):
        shade *= _line_shade(h, w, rng, depth=0.16 * strength * rng.uniform(0.5, 1.0),
                             width_px=rng.uniform(8, 30) * s, fine_px=max(0.6, 1.2 * s))
    return _multiply(img, shade)


def wrinkles(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Crumpled paper: ridged height field (sharp folds) shades the page, lit from one side, and bends lines."""
    height = _paper_height(img.shape[0], img.shape[1], rng)
    ch, cw = height.shape
    gy, gx = np.gradient(height)  # per coarse pixel
    light = rng.uniform(0, 2 * math.pi)
    slope = (gx * math.cos(light) + gy * math.sin(light)) * (max(ch, cw) / 12.0)
    shade = 1.0 + 0.12 * strength * slope - 0.06 * strength * (1.0 - height)
    return _multiply(_bend(img, height, strength), np.clip(shade, 0.5, 1.3).astype(np.float32))


def _paper_height(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The crumpled paper's height field at 1/4 resolution (smooth: the shade and bend are upsampled)."""
    ch, cw = max(4, h // 4), max(4, w // 4)
    height = np.zeros((ch, cw), np.float32)
    for cells, amp in ((int(rng.integers(3, 6)), 1.0), (int(rng.integers(7, 12)), 0.35)):
        n = _smooth_field(ch, cw, rng, cells, out_factor=1)
        height += amp * (1.0 - np.abs(n))  # ridges where the noise crosses zero
    return height / 1.35


def _bend(img: np.ndarray, height: np.ndarray, strength: float) -> np.ndarray:
    """Displace `img` (any channel count) along the height field: the lines bent by the wrinkles."""
    h, w = img.shape[:2]
    amp = 5.0 * strength * _scale(img)
    dx = cv2.resize((amp * (height - 0.5)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    dy = cv2.resize((amp * 0.7 * (np.roll(height, height.shape[0] // 3, axis=0) - 0.5)).astype(np.float32), (w, h),
                    interpolation=cv2.INTER_LINEAR)
    return cv2.remap(img, dx, dy, cv2.INTER_LINEAR | cv2.WARP_RELATIVE_MAP, borderMode=cv2.BORDER_REPLICATE)


def text_stamps(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Administrative marks on the page: a fax/print line, a rubber stamp, a ward note (no diagnoses)."""
    out = img.copy()
    h, w = out.shape[:2]
    s = _scale(img)
    n = 1 + int(rng.integers(0, 1 + round(2 * strength)))
    def num(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi))

    for _ in range(n):
        kind = num(0, 3)
        if kind == 0:  # fax / printer line along the top or bottom edge
            day = f"{num(1, 29):02d}/{num(1, 13):02d}/{num(1995, 2025)}"
            text = (f"{day} {num(0, 24):02d}:{num(0, 60):02d}   FROM: {num(100000, 999999)}   "
                    f"P.{num(1, 9):03d}/{num(1, 9):03d}")
            y = rng.uniform(0.002, 0.02) * h if rng.random() < 0.6 else h - rng.uniform(0.02, 0.04) * h
            draw_text(out, text, (rng.uniform(0.02, 0.3) * w, y), int(22 * s), (20, 20, 20),
                      opacity=0.6 + 0.4 * strength)
        elif kind == 1:  # rubber stamp: bordered words in coloured ink, rotated
            word = str(rng.choice(["RECEIVED", "COPY", "SCANNED", "FILED", "REVIEWED", "ARCHIVE"]))
            month = str(rng.choice(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "SEP", "OCT"]))
            sub = f"{num(1, 29):02d} {month} {num(1995, 2025)}"
            ink = [(190, 30, 40), (40, 60, 170), (110, 40, 140)][num(0, 3)]
            _stamp(out, [word, sub], ink, (rng.uniform(0.1, 0.8) * w, rng.uniform(0.1, 0.8) * h),
                   int(46 * s), rng.uniform(-25, 25), 0.45 + 0.45 * strength)
        else:  # a ward / bed note in pen-blue print
            text = (f"{rng.choice(['Ward', 'Room', 'Bed', 'Unit'])} {num(1, 40)}{rng.choice(['A', 'B', 'C', ''])}"
                    f"  #{num(1000, 99999)}")
            draw_text(out, text, (rng.uniform(0.05, 0.8) * w, rng.uniform(0.05, 0.9) * h), int(34 * s),
                      (30, 40, 120), opacity=0.5 + 0.4 * strength)
    return out


def _stamp(canvas: np.ndarray, lines: list[str], ink, center, size_px: int, angle: float, opacity: float) -> None:
    """Draw a bordered multi-line stamp into `canvas` in place, rotated by `angle` degrees."""
    masks = [text_mask(t, size_px if i == 0 else int(size_px * 0.55))[0] for i, t in enumerate(lines)]
    pad = max(4, size_px // 4)
    bw = max(m.shape[1] for m in masks) + 2 * pad
    bh = sum(m.shape[0] for m in masks) + pad * (len(masks) + 1)
    patch = np.zeros((bh, bw), np.uint8)
    y = pad
    for m in masks:
        x = (bw - m.shape[1]) // 2
        patch[y:y + m.shape[0], x:x + m.shape[1]] = np.maximum(patch[y:y + m.shape[0], x:x + m.shape[1]], m)
        y += m.shape[0] + pad
    t = max(2, size_px // 12)
    cv2.rectangle(patch, (t // 2, t // 2), (bw - 1 - t // 2, bh - 1 - t // 2), 255, t, cv2.LINE_AA)
    diag = int(math.hypot(bw, bh)) + 2
    m = cv2.getRotationMatrix2D((bw / 2, bh / 2), angle, 1.0)
    m[:, 2] += ((diag - bw) / 2, (diag - bh) / 2)
    patch = cv2.warpAffine(patch, m, (diag, diag), flags=cv2.INTER_LINEAR)
    h, w = canvas.shape[:2]
    x0, y0 = int(center[0] - diag / 2), int(center[1] - diag / 2)
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + diag), min(h, y0 + diag)
    if xa >= xb or ya >= yb:
        return
    a = patch[ya - y0:yb - y0, xa - x0:xb - x0, None].astype(np.float32) * (opacity / 255.0)
    region = canvas[ya:yb, xa:xb]
    # Ink multiplies (a stamp darkens what is under it rather than covering it).
    inked = region.astype(np.float32) * (np.asarray(ink, np.float32) / 255.0)
    region[:] = np.round(region * (1 - a) + inked * a).astype(np.uint8)


# ---------------------------------------------------------------- light and colour


def lighting(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven light: a gradient across the page, a vignette, and often a soft shadow (hand, phone)."""
    h, w = img.shape[:2]
    f = 8
    ch, cw = max(2, h // f), max(2, w // f)
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    xx, yy = xx / cw - 0.5, yy / ch - 0.5
    a = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.35 * strength * rng.uniform(0.4, 1.0) * (xx * math.cos(a) + yy * math.sin(a)) * 2
    shade -= 0.35 * strength * rng.uniform(0.2, 1.0) * (xx ** 2 + yy ** 2) * 2
    if rng.random() < 0.7:  # a soft-edged shadow over part of the page
        b = rng.uniform(0, 2 * math.pi)
        edge = (xx * math.cos(b) + yy * math.sin(b)) - rng.uniform(0.05, 0.45)
        soft = rng.uniform(0.03, 0.12)
        shade *= 1.0 - 0.45 * strength * rng.uniform(0.5, 1.0) / (1.0 + np.exp(-edge / soft))
    if rng.random() < 0.3:  # a glare spot
        gx, gy = rng.uniform(-0.4, 0.4, 2)
        shade += 0.25 * strength * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / rng.uniform(0.005, 0.03))
    return _multiply(img, shade.astype(np.float32))


def color_shift(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Colour temperature (warm/cool cast) and fading (ink loses contrast, paper yellows)."""
    t = float(rng.uniform(-1, 1)) * strength
    gains = np.array([1 + 0.10 * t, 1 + 0.02 * t, 1 - 0.12 * t], np.float32)
    fade = float(rng.uniform(0.2, 1.0)) * 0.45 * strength
    tone = np.array([250, 244, 226], np.float32) if rng.random() < 0.6 else np.array([245, 245, 245], np.float32)
    m = np.zeros((3, 4), np.float32)
    m[:, :3] = np.diag(gains * (1 - fade))
    m[:, 3] = tone * fade
    return cv2.transform(img, m)


def photocopy(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Black-and-white copy: grey, contrast pushed until faint grid lines drop out at high strength."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gain = 1.0 + 3.0 * strength * rng.uniform(0.6, 1.0)
    white = 255 - 60 * strength * rng.uniform(0.3, 1.0)  # grey above this turns white
    out = np.clip((gray - white) * gain + 255, 0, 255)
    return cv2.cvtColor(out.astype(np.uint8), cv2.COLOR_GRAY2RGB)


# ---------------------------------------------------------------- optics and noise


def defocus_blur(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Out-of-focus camera: a disk kernel of radius up to 3.5 px·scale."""
    r = (0.5 + 3.0 * strength * rng.uniform(0.5, 1.0)) * _scale(img)
    n = int(math.ceil(r)) * 2 + 1
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    k = np.clip(r + 0.5 - np.hypot(xx, yy), 0.0, 1.0).astype(np.float32)  # disk with soft (area) edge
    return _filter_fast(img, k / k.sum())


def motion_blur(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: a line kernel of up to 14 px·scale at a random angle."""
    length = (2.0 + 12.0 * strength * rng.uniform(0.5, 1.0)) * _scale(img)
    n = int(math.ceil(length)) | 1
    k = np.zeros((n, n), np.float32)
    a = rng.uniform(0, math.pi)
    c = (n - 1) / 2
    dx, dy = math.cos(a) * (length - 1) / 2, math.sin(a) * (length - 1) / 2
    cv2.line(k, (int(round((c - dx) * 16)), int(round((c - dy) * 16))),
             (int(round((c + dx) * 16)), int(round((c + dy) * 16))), 1.0, 1, cv2.LINE_AA, 4)
    if k.sum() <= 0:
        return img.copy()
    return _filter_fast(img, k / k.sum())


def gaussian_noise(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: grey noise of σ up to 16 grey levels, half the time with colour noise on top."""
    sigma = 16.0 * strength
    grey = _noise_tile_for(rng) * sigma
    if rng.random() < 0.5:
        tiles = [grey + _noise_tile_for(rng) * (0.4 * sigma) for _ in range(3)]
    else:
        tiles = [grey] * 3
    return _add_noise(img, tiles)


def salt_pepper(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Dust and toner specks: up to 1.5% of pixels turned black or white."""
    h, w = img.shape[:2]
    out = img.copy()
    n = max(1, int(0.015 * strength * h * w))
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    out[ys, xs] = np.where(rng.random(n) < 0.5, 0, 255)[:, None].astype(np.uint8)
    return out


def jpeg(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG re-compression at quality 95 (strength 0) down to 12 (strength 1)."""
    q = int(round(95 - 83 * strength * rng.uniform(0.8, 1.0)))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode the page")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


ARRAY_ARTIFACTS: dict[str, ArrayFn] = {
    "rotate": rotate,
    "perspective": perspective,
    "creases": creases,
    "wrinkles": wrinkles,
    "lighting": lighting,
    "gaussian_noise": gaussian_noise,
    "salt_pepper": salt_pepper,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "jpeg": jpeg,
    "color_shift": color_shift,
    "photocopy": photocopy,
    "crop_pad": crop_pad,
    "text_stamps": text_stamps,
}


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the (H, W, 3) uint8 RGB array the artifacts work on."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def apply_artifact(image: Image.Image, name: str, strength: float, seed: int = 0) -> Image.Image:
    """One artifact by name on a PIL image; strength 0 returns the image unchanged."""
    if name not in ARRAY_ARTIFACTS:
        raise InputError(f"unknown artifact {name!r} (known: {', '.join(ARRAY_ARTIFACTS)})")
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"artifact {name}: strength {strength} is outside [0, 1]")
    if strength == 0.0:
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(apply_artifact_array(to_rgb_array(image), name, strength, seed), "RGB")


def apply_artifact_array(arr: np.ndarray, name: str, strength: float, seed: int = 0) -> np.ndarray:
    """One artifact on an (H, W, 3) uint8 RGB array (the presets' fast path); same seed, same pixels."""
    return ARRAY_ARTIFACTS[name](arr, float(strength), artifact_rng(seed, _salt(name)))


def warp_mask_array(mask: np.ndarray, name: str, strength: float, seed: int = 0) -> np.ndarray:
    """Move an (H, W) uint8 mask of a page exactly as artifact `name` moves the page's pixels (same seed,
    same draws); zero where the warp uncovers the background. Photometric artifacts leave a mask as is."""
    h, w = mask.shape[:2]
    rng = artifact_rng(seed, _salt(name))
    if name == "rotate":
        return cv2.warpAffine(mask, _rotation(h, w, strength, rng), (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if name == "perspective":
        return cv2.warpPerspective(mask, _homography(h, w, strength, rng), (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if name == "crop_pad":
        box, _, ox, oy = _placement(h, w, strength, rng)
        return _place(mask, box, np.zeros_like(mask), ox, oy)
    if name == "wrinkles":
        return _bend(mask, _paper_height(h, w, rng), strength)
    return mask


def _salt(name: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def _wrap(name: str) -> Callable[[Image.Image, float, int], Image.Image]:
    def fn(image: Image.Image, strength: float, seed: int = 0) -> Image.Image:
        return apply_artifact(image, name, strength, seed)

    fn.__name__ = name
    fn.__doc__ = ARRAY_ARTIFACTS[name].__doc__
    return fn


ARTIFACTS: dict[str, Callable[[Image.Image, float, int], Image.Image]] = {n: _wrap(n) for n in ARRAY_ARTIFACTS}
