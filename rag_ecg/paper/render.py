"""Paper-ECG rendering: a record (mV) -> a picture on real paper geometry, plus where each lead went.

Why this shape: the encoder is trained and queried on *pictures* of ECGs, so reference pages must look like
what clinics print (25 mm/s, 10 mm/mV, 1 mm / 5 mm grid to scale, calibration pulse, labels, header) and
must be cheap enough to redraw every epoch (about 50x faster than drawing the page with matplotlib, see
bench/render.py). This module composes a page: `layout` says where things go, `drawing` draws the grid,
pens and text, `header` writes the header, `presets` (of `artifacts`) turn the clean page into a print, scan or photo.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from rag_ecg.data.records import STANDARD_LEADS, ECGRecord
from rag_ecg.errors import InputError
from rag_ecg.paper.drawing import decimate, draw_text, grid_page, polyline
from rag_ecg.paper.header import estimate_heart_rate, header_lines
from rag_ecg.paper.layout import LeadBox, RenderConfig, RenderResult, page_geometry, random_config
from rag_ecg.paper.presets import PRESETS, apply_preset_array


def render_record(record: ECGRecord, config: RenderConfig | None = None, seed: int = 0) -> RenderResult:
    """Draw one record on ECG paper. Signal from `record.signal_mv()` ((samples, 12) mV); no artifacts.

    The seed only matters with `config.start_s=None` (random page start within a longer record).
    """
    canvas, result = render_array(record, config, seed)
    result.image = Image.fromarray(canvas, "RGB")
    return result


def render_array(record: ECGRecord, config: RenderConfig | None = None, seed: int = 0,
                 trace_mask: np.ndarray | None = None) -> tuple[np.ndarray, RenderResult]:
    """`render_record` without the PIL wrap: the page as (H, W, 3) uint8 RGB (result.image is None).

    `trace_mask`, an (H, W) uint8 zero array, receives the pen's coverage (0-255) of everything drawn with it:
    traces, calibration pulses and separator ticks (not text, not grid): the segmenter's labels (`trace_labels`).
    """
    cfg = (config or RenderConfig()).validate()
    sig = record.signal_mv()
    fs = float(record.fs)
    lead_ix = {ld: record.leads.index(ld) for ld in STANDARD_LEADS}
    geo = page_geometry(cfg, record.duration_s)
    ppm = geo.ppm
    if cfg.start_s is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]))
        start = float(rng.uniform(0.0, max(0.0, record.duration_s - geo.page_s)))
    else:
        start = min(cfg.start_s, max(0.0, record.duration_s - geo.page_s))
    start = math.floor(start * fs) / fs

    gx0, gy0, gx1, gy1 = geo.grid_mm
    canvas = np.array(grid_page(geo.size, (gx0 * ppm, gy0 * ppm, gx1 * ppm, gy1 * ppm), ppm, cfg.grid_color,
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
            polyline(canvas, xs, ys, color, thick)
            if trace_mask is not None:
                polyline(trace_mask, xs, ys, (255,), thick)
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
            xs, ys = decimate(xs, ys, fs / px_per_s)
            if cfg.clip_traces:  # anti-aliasing spills about a pixel past the pen: keep that inside too
                ys = np.clip(ys, box[1] + half + 1, box[3] - 2 - half)
            xs = np.clip(xs, box[0] + half + 1, box[2] - 2 - half)
            polyline(canvas, xs, ys, color, thick)
            if trace_mask is not None:
                polyline(trace_mask, xs, ys, (255,), thick)
            if cfg.separators and c > 0:
                tick = 2.5 * ppm
                polyline(canvas, np.array([bx0, bx0]), np.array([base - tick, base + tick]), color, thick)
                if trace_mask is not None:
                    polyline(trace_mask, np.array([bx0, bx0]), np.array([base - tick, base + tick]), (255,), thick)
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


# ---------------------------------------------------------------- the one-call page


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
    if preset not in PRESETS:
        raise InputError(f"render preset {preset!r} is not one of {', '.join(PRESETS)}")
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xEC6])
    cfg_seed, render_seed, art_seed = (int(s) for s in ss.generate_state(3))
    if config is None:
        config = (random_config(np.random.default_rng(cfg_seed), dpi=dpi) if preset == "random"
                  else RenderConfig(dpi=dpi))
    canvas, result = render_array(record, config, seed=render_seed)
    result.image = Image.fromarray(apply_preset_array(canvas, preset, seed=art_seed), "RGB")
    return result.image, result
