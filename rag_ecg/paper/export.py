"""What `digitize` leaves for one picture: the signal as WFDB (mV), a JSON account of the read, an overlay PNG.

Why these three: WFDB is what every ECG tool reads (wfdb, PhysioNet, the project's own ingest); the JSON says
how the numbers were made (layout, boxes, px/mm and where it came from, deskew, quarter turns, perspective), so a
wrong read can be traced to its step; the overlay lets a person see at a glance whether the read traces sit on the
ink.

Files are `<stem>.dat`, `<stem>.hea`, `<stem>.overlay.png`, then `<stem>.json` last: each is written atomically,
and the JSON is the mark that a picture is done (a run killed half-way leaves no JSON, so it is redone).
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import cv2
import numpy as np
import wfdb
from PIL import Image

from rag_ecg import __version__
from rag_ecg.data.images import save_image
from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.io import atomic_write, write_json
from rag_ecg.paper.calibration import Calibration, to_millivolts
from rag_ecg.paper.digitize import FS, N_SAMPLES, Digitized
from rag_ecg.paper.ink import INK_ON

OUT_FS = 500  # Hz of the WFDB signal
ADC_GAIN = 1000.0  # digital units per mV: 1 uV steps, +-32.7 mV range in 16 bits (-32768 is WFDB's "missing")
SUFFIXES = (".dat", ".hea", ".overlay.png", ".json")
_LEAD_INDEX = {ld: i for i, ld in enumerate(STANDARD_LEADS)}


def safe_stem(name: str) -> str:
    """A WFDB record name for a picture's stem: letters, digits, '-' and '_' only (WFDB refuses the rest)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return stem or "picture"


def output_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Where one picture's outputs go, by suffix."""
    out_dir = Path(out_dir)
    return {s: out_dir / f"{stem}{s}" for s in SUFFIXES}


def outputs_exist(out_dir: str | Path, stem: str) -> bool:
    """All outputs of a picture are there (the JSON is written last, so it marks a finished picture)."""
    return all(p.is_file() for p in output_paths(out_dir, stem).values())


def trace_points(read: Digitized) -> list[tuple[str, tuple[float, float, float, float], np.ndarray]]:
    """Per printed lead box: (lead, box, (n, 2) working-frame x, y of the read trace, NaN rows where unread).

    The read's sample at time t of a box [t0, t1) sits at x = x0 + (t - t0) / (t1 - t0) * (x1 - x0), y = the
    row's baseline (the box's middle) minus the trace height; a lead printed twice (lead II in a 3x4 block and
    its rhythm strip) is drawn in each place from that row's own read (`Digitized.row_px`), so the overlay lies on
    the ink even where the two rows' baselines wander apart."""
    heights = _heights(read)
    out = []
    for lead, box, t0, t1 in read.boxes:
        x0, y0, x1, y1 = box
        a, b = int(round(t0 * FS)), min(N_SAMPLES, int(round(t1 * FS)))
        if b - a < 2:
            continue
        t = np.arange(a, b) / FS
        x = x0 + (t - t0) / max(t1 - t0, 1e-9) * (x1 - x0)
        base = 0.5 * (y0 + y1)
        if len(read.row_px) == len(read.rows) and read.rows:
            row = int(np.argmin([abs(base - r) for r in read.rows]))
            y = base - np.asarray(read.row_px[row][a:b], np.float64)
        else:
            y = base - heights[_LEAD_INDEX[lead], a:b]
        out.append((lead, box, np.stack([x, y], axis=1)))
    return out


def read_quality(read: Digitized, ink: np.ndarray) -> dict:
    """How trustworthy a read looks without any truth: `coverage` (share of the layout's printed lead time that
    holds a read value), `on_ink` (share of read points within 1.5 px of pen ink on the working page: a trace
    that jumped to a label, a neighbour's spike or the grid leaves the ink) and `score` = their product."""
    printed = int(read.mask.sum())
    heights = _heights(read)
    coverage = float(np.isfinite(heights[read.mask]).sum() / printed) if printed else 0.0
    near = cv2.dilate((ink > INK_ON).astype(np.uint8), np.ones((4, 4), np.uint8))
    h, w = near.shape
    hits = total = 0
    for _, _, pts in trace_points(read):
        ok = np.isfinite(pts).all(axis=1)
        xi = np.clip(np.rint(pts[ok, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.rint(pts[ok, 1]).astype(int), 0, h - 1)
        hits += int(near[yi, xi].sum())
        total += int(ok.sum())
    on_ink = hits / total if total else 0.0
    return {"coverage": round(coverage, 4), "on_ink": round(on_ink, 4), "score": round(coverage * on_ink, 4)}


def overlay(picture: np.ndarray, read: Digitized, cal: Calibration | None = None) -> np.ndarray:
    """The picture with the read traces drawn over it (a colour far from the paper's and the pen's), each lead's
    box outlined and named, and a one-line note of the layout and scale, all at their places on the picture."""
    img = np.ascontiguousarray(picture.copy())
    h, w = img.shape[:2]
    color = _contrast_color(picture)
    thick = max(1, int(round(max(h, w) / 1400)))
    font = max(0.4, max(h, w) / 2400)
    for lead, box, pts in trace_points(read):
        x0, y0, x1, y1 = box
        corners = read.picture_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
        cv2.polylines(img, [np.rint(corners).astype(np.int32)], True, (160, 160, 160), 1, cv2.LINE_AA)
        for seg in _segments(read.picture_points(pts) if len(pts) else pts):
            cv2.polylines(img, [np.rint(seg * 16).astype(np.int32)], False, color, thick, cv2.LINE_AA, shift=4)
        _label(img, lead, corners[0] + np.array([4.0, 4.0 + 22 * font]), font, color)
    if cal is not None:
        _label(img, f"{read.layout}  {cal.px_per_mm / max(read.picture_scale, 1e-9):.2f} px/mm ({cal.source})  "
                    f"{cal.speed_mm_s:g} mm/s  {cal.gain_mm_mv:g} mm/mV", np.array([6.0, 6.0 + 22 * font]), font, color)
    return img


def write_wfdb(out_dir: str | Path, stem: str, signal_mv: np.ndarray, fs: float = OUT_FS,
               comments: list[str] | None = None) -> Path:
    """`<stem>.hea/.dat` from a (samples, 12) mV array, NaN = not printed (WFDB's missing value); atomic per file.

    wfdb writes into a scratch folder; each file is then published beside the others with `atomic_write`, the
    .dat before the .hea that names it, so a reader never finds a header without its samples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sig = np.clip(np.asarray(signal_mv, np.float64), -32.0, 32.0)  # NaN stays NaN
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stem}.") as tmp:
        wfdb.wrsamp(stem, fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=sig, fmt=["16"] * 12,
                    adc_gain=[ADC_GAIN] * 12, baseline=[0] * 12, comments=comments or [], write_dir=tmp)
        for suffix in (".dat", ".hea"):
            atomic_write(out_dir / f"{stem}{suffix}", (Path(tmp) / f"{stem}{suffix}").read_bytes())
    return out_dir / f"{stem}.hea"


def write_outputs(out_dir: str | Path, stem: str, picture: np.ndarray, read: Digitized, cal: Calibration,
                  quality: dict, source: str = "", extra: dict | None = None) -> dict:
    """Write one picture's WFDB record, overlay and JSON (last; `extra` merged into it); returns the JSON."""
    paths = output_paths(out_dir, stem)
    mv = to_millivolts(read, cal, OUT_FS)
    write_wfdb(out_dir, stem, mv, OUT_FS, comments=[f"rag-ecg {__version__} digitize: {Path(source).name or stem}",
                                                    f"layout {read.layout}, px/mm from the {cal.source}"])
    # fastest PNG compression: the overlay of a noisy photo takes ~1 s at the default level, ~0.4 s at 1
    save_image(Image.fromarray(overlay(picture, read, cal)), paths[".overlay.png"], compress_level=1)
    info = {**describe(read, cal, quality, picture.shape, mv, source), **(extra or {})}
    write_json(paths[".json"], info)
    return info


def describe(read: Digitized, cal: Calibration, quality: dict, picture_shape: tuple, mv: np.ndarray,
             source: str = "") -> dict:
    """The JSON account of a read: layout, per-lead boxes (picture and working px) and time windows, scales and
    where they came from, the geometry applied, the read quality, and which leads hold samples."""
    leads = []
    for lead, box, t0, t1 in read.boxes:
        x0, y0, x1, y1 = box
        corners = read.picture_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        leads.append({"lead": lead, "t_start": round(t0, 4), "t_end": round(t1, 4),
                      "box_picture": [round(float(v), 1) for v in (*lo, *hi)],
                      "box_working": [round(float(v), 1) for v in box]})
    held = np.isfinite(mv)
    return {
        "picture": str(source), "picture_size": [int(picture_shape[1]), int(picture_shape[0])],
        "layout": read.layout, "leads": leads,
        "paper_speed_mm_s": cal.speed_mm_s, "gain_mm_mv": cal.gain_mm_mv,
        "px_per_mm": round(cal.px_per_mm / max(read.picture_scale, 1e-9), 4),  # the picture's own px (its middle)
        "px_per_mm_source": cal.source,
        "calibration": cal.to_json(),  # its px values are working-page px
        "geometry": {"quarter_turns_ccw": int(read.turns), "deskew_deg": round(float(read.angle), 3),
                     "work_scale": round(float(read.work_scale), 6), "work_size": list(read.work_size),
                     "perspective": perspective_json(read)},
        "quality": quality,
        "signal": {"fs": OUT_FS, "samples": int(mv.shape[0]), "units": "mV", "leads": list(STANDARD_LEADS),
                   "seconds_held": {ld: round(float(held[:, i].sum()) / OUT_FS, 3) for i, ld in enumerate(STANDARD_LEADS)}},
        "rag_ecg": __version__,
    }


def perspective_json(read: Digitized) -> dict | None:
    """The perspective correction a read applied (`paper/perspective.py`), None if it read the page as it lay:
    `matrix`, the homography from the picture's px (turned `quarter_turns_ccw` times) to the working page's px
    before the deskew; `corners_picture`, where the working page's corners (top-left, top-right, bottom-right,
    bottom-left) lie on the picture as given: the quadrilateral that was read as a flat rectangle."""
    if read.homography is None:
        return None
    m = read.homography @ np.diag([read.work_scale, read.work_scale, 1.0])
    w, h = read.work_size
    corners = read.picture_points(np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64))
    return {"matrix": [[float(f"{v:.8g}") for v in row] for row in m / m[2, 2]],
            "corners_picture": [[round(float(v), 1) for v in c] for c in corners]}


# ---------------------------------------------------------------- helpers


def _heights(read: Digitized) -> np.ndarray:
    """(12, N) trace height above the row baseline, working px, NaN where not printed (the read's own raw
    heights where it keeps them, else its page-normalised signal times the divisor)."""
    if read.raw_px is not None:
        return np.asarray(read.raw_px, np.float64)
    return np.where(read.mask, read.signal.astype(np.float64) * read.scale_px, np.nan)


def _segments(pts: np.ndarray) -> list[np.ndarray]:
    """Runs of finite points (a polyline breaks where the read has no value)."""
    ok = np.isfinite(pts).all(axis=1) if len(pts) else np.zeros(0, bool)
    out, start = [], None
    for i, good in enumerate(list(ok) + [False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if i - start >= 2:
                out.append(pts[start:i])
            start = None
    return out


def _contrast_color(picture: np.ndarray) -> tuple[int, int, int]:
    """Of blue, green and magenta, the one farthest from both the paper and the grid's colour (the pen is dark):
    green traces on a green grid would hide in it."""
    px = picture[::8, ::8].reshape(-1, 3).astype(np.float64)
    refs = [np.median(px, axis=0)]
    coloured = px[px.max(axis=1) - px.min(axis=1) > 40]
    if len(coloured) > 0.01 * len(px):
        refs.append(np.median(coloured, axis=0))
    choices = [(0, 90, 255), (0, 170, 0), (220, 0, 200)]
    return max(choices, key=lambda c: min(float(np.abs(np.asarray(c) - r).sum()) for r in refs))


def _label(img: np.ndarray, text: str, at: np.ndarray, scale: float, color: tuple[int, int, int]) -> None:
    """Text with a white halo, readable on any paper, kept inside the picture. (The halo is the text's own mask
    grown: OpenCV spaces thicker text wider, so a thick white copy would not sit under the glyphs.)"""
    thick = max(1, int(round(scale * 1.5)))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    h, w = img.shape[:2]
    x = int(np.clip(at[0], 2, max(2, w - tw - 2)))
    y = int(np.clip(at[1], th + 2, max(th + 2, h - base - 2)))
    mask = np.zeros((h, w), np.uint8)
    cv2.putText(mask, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    halo = cv2.dilate(mask, np.ones((2 * thick + 1, 2 * thick + 1), np.uint8))
    box = (slice(max(0, y - th - 2 * thick), y + base + 2 * thick), slice(max(0, x - 2 * thick), x + tw + 2 * thick))
    region, m, g = img[box].astype(np.float32), mask[box][..., None] / 255.0, halo[box][..., None] / 255.0
    region = region * (1 - g) + 255.0 * g
    img[box] = (region * (1 - m) + np.asarray(color, np.float32) * m).astype(np.uint8)
