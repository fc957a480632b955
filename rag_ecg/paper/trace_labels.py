"""Pixel-exact trace labels: a rendered page plus the mask of the pixels its pen drew.

Why: the renderer knows where every trace went, so every page of every artifact preset is a free, exact
label for a learned trace segmenter (`segmenter`). The pen's coverage is drawn into a second canvas with
the very strokes of the page (`render_array(trace_mask=...)`), then carried through the preset's geometric
steps (rotate, perspective, crop_pad, wrinkles) with the same parameters (`artifacts.warp_mask_array`);
photometric steps leave it as is. The label is everything the pen drew — lead traces, calibration pulses,
separator ticks — and nothing printed as text or grid: the digitiser finds and trims pulses and ticks itself
(as on the classical ink map), and another renderer's pulse that runs straight into the trace (ECG-Image-Kit)
must not take the trace's first beat with it.
"""
from __future__ import annotations

import numpy as np

from rag_ecg.data.records import ECGRecord
from rag_ecg.errors import InputError
from rag_ecg.paper.artifacts import apply_artifact_array, warp_mask_array
from rag_ecg.paper.layout import RenderConfig, RenderResult, page_geometry, random_config
from rag_ecg.paper.presets import PRESETS, preset_steps
from rag_ecg.paper.render import render_array

MASK_ON = 64  # pen coverage (0-255) from which a pixel counts as trace: a quarter of the pixel inked


def render_with_coverage(record: ECGRecord, preset: str = "clean", seed: int = 0,
                         config: RenderConfig | None = None,
                         dpi: int = 200) -> tuple[np.ndarray, np.ndarray, RenderResult]:
    """(page (H, W, 3) uint8, trace coverage (H, W) uint8 0-255, clean layout) for `render_page`'s arguments.

    The page is pixel for pixel `render_page(record, preset, seed, config, dpi)`: the same seeds, the same steps.
    """
    if preset not in PRESETS:
        raise InputError(f"render preset {preset!r} is not one of {', '.join(PRESETS)}")
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xEC6])  # as render_page_and_layout
    cfg_seed, render_seed, art_seed = (int(s) for s in ss.generate_state(3))
    if config is None:
        config = (random_config(np.random.default_rng(cfg_seed), dpi=dpi) if preset == "random"
                  else RenderConfig(dpi=dpi))
    cfg = config.validate()
    w, h = page_geometry(cfg, record.duration_s).size
    coverage = np.zeros((h, w), np.uint8)
    page, result = render_array(record, cfg, seed=render_seed, trace_mask=coverage)
    for name, strength, step_seed in preset_steps(preset, art_seed):
        if strength > 0:
            page = apply_artifact_array(page, name, strength, step_seed)
            coverage = warp_mask_array(coverage, name, strength, step_seed)
    return page, coverage, result


def render_page_with_trace_mask(record: ECGRecord, preset: str = "clean", seed: int = 0,
                                config: RenderConfig | None = None, dpi: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(page (H, W, 3) uint8 = `render_page`'s pixels, (H, W) bool: pixels the pen drew)."""
    page, coverage, _ = render_with_coverage(record, preset, seed, config, dpi)
    return page, coverage >= MASK_ON

