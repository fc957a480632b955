"""The segmenter recipe's data: PTB-XL records drawn on fresh random pages under every preset, with their
pixel-exact trace masks, resized to the digitiser's working width (and zoomed), cut into random crops.

Pages are costly next to a small network's step, so a pool of rendered pages is kept and a few are
replaced every step; each batch takes its crops from random pages of the pool.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from rag_ecg import paths
from rag_ecg.data.records import ECGRecord, PtbxlRow, ptbxl_record, read_ptbxl_index
from rag_ecg.errors import ConfigError
from rag_ecg.paper.layout import random_config
from rag_ecg.paper.trace_labels import MASK_ON, render_with_coverage
from training.segmenter_config import SegmenterTrainConfig


def ptbxl_rows(cfg: SegmenterTrainConfig, folds: Sequence[int], limit: int | None = None) -> list[PtbxlRow]:
    """PTB-XL index rows of `folds` (signals are read when a page needs them)."""
    root = Path(cfg.ptbxl) if cfg.ptbxl else paths.shared_data_dir() / "ptbxl"
    if not (root / "ptbxl_database.csv").is_file():
        raise ConfigError(f"ptbxl: {root} has no ptbxl_database.csv (set ptbxl= or RAG_ECG_SHARED_DATA)")
    rows, _ = read_ptbxl_index(root)
    out = [r for r in rows if r.fold in set(folds)]
    if limit:
        out = out[:limit]
    if not out:
        raise ConfigError(f"ptbxl: no records of fold(s) {list(folds)} in {root}")
    return out


_RECORDS: dict[str, ECGRecord] = {}


def _record(row: PtbxlRow) -> ECGRecord:
    """The row's signal, read once (1,442 records of folds 1-8 hold ~60 MB)."""
    if row.ecg_id not in _RECORDS:
        _RECORDS[row.ecg_id] = ptbxl_record(row)
    return _RECORDS[row.ecg_id]


def working_page(page: np.ndarray, coverage: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Page and trace mask at `width` columns, resized the way `digitize` resizes pictures (area down, cubic up);
    the mask is the resized pen coverage >= MASK_ON, so thin pens stay marked where they darken a pixel."""
    h, w = page.shape[:2]
    size = (width, max(8, int(round(h * width / w))))
    up = width > w
    page = cv2.resize(page, size, interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)
    cov = cv2.resize(coverage, size, interpolation=cv2.INTER_LINEAR if up else cv2.INTER_AREA)
    return page, cov >= MASK_ON


def draw_page(cfg: SegmenterTrainConfig, row: PtbxlRow, seed: int, preset: str | None = None,
              zoom: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One labelled working page: (H, W, 3) uint8, (H, W) bool trace mask. Preset, dpi and zoom from `seed`."""
    rng = np.random.default_rng([seed, 0x5E6])
    preset = preset or str(rng.choice(cfg.presets))
    dpi = int(rng.integers(cfg.dpi_range[0], cfg.dpi_range[1] + 1))
    z = math.exp(rng.uniform(math.log(cfg.zoom_range[0]), math.log(cfg.zoom_range[1]))) if zoom else 1.0
    # random layouts, pens and colours mostly; the default 3x4 + II page (the "clean" look) a quarter of the time
    config = random_config(np.random.default_rng([seed, 0xC0F]), dpi=dpi) if rng.random() < 0.75 else None
    page, coverage, _ = render_with_coverage(_record(row), preset, seed, config, dpi)
    if rng.random() < cfg.augment:
        page = pen_variety(page, coverage, rng)
    return working_page(page, coverage, max(64, int(round(cfg.work_width * z))))


def pen_variety(page: np.ndarray, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What real pictures show and the presets do not: faded grey pens (lighter than a dark grid's lines),
    grey prints, and small low-resolution pictures blown up. Only the pixels change, never the geometry."""
    out = page
    if rng.random() < 0.5:  # a grey pen: trace pixels lifted towards the paper beside them
        lift = rng.uniform(0.2, 0.65) * coverage.astype(np.float32)[:, :, None] / 255.0
        paper = cv2.dilate(out, np.ones((5, 5), np.uint8)).astype(np.float32)
        out = np.clip(out + lift * (paper - out), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if rng.random() < 0.4:  # a small picture, upsampled
        h, w = out.shape[:2]
        f = rng.uniform(1.3, 2.6)
        small = cv2.resize(out, (max(8, int(w / f)), max(8, int(h / f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return out


@dataclass
class PagePool:
    """Rendered training pages, refreshed a few per step; crops drawn from them."""

    cfg: SegmenterTrainConfig
    rows: list[PtbxlRow]
    seed: int

    def __post_init__(self):
        self.pages: list[tuple[np.ndarray, np.ndarray]] = []
        self.drawn = 0  # pages rendered so far (the next page's index in the stream)
        self.credit = 0.0
        self.rng = np.random.default_rng([self.seed, 0xB47])

    def _next_page(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.drawn
        self.drawn += 1
        r = np.random.default_rng([self.seed, k, 0xA6E])
        return draw_page(self.cfg, self.rows[int(r.integers(len(self.rows)))], int(r.integers(2**31 - 1)))

    def skip_to(self, drawn: int) -> None:
        """Resume the page stream at page `drawn` (the pool is refilled from there)."""
        self.drawn = drawn

    def refresh(self) -> None:
        while len(self.pages) < self.cfg.pool:
            self.pages.append(self._next_page())
        self.credit += self.cfg.pages_per_step
        while self.credit >= 1.0:
            self.credit -= 1.0
            self.pages[int(self.rng.integers(len(self.pages)))] = self._next_page()

    def batch(self, n: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, crop, crop, 3) uint8 and (n, crop, crop) bool: random crops of random pool pages."""
        self.refresh()
        xs = np.empty((n, crop, crop, 3), np.uint8)
        ys = np.empty((n, crop, crop), bool)
        for i in range(n):
            page, mask = self.pages[int(self.rng.integers(len(self.pages)))]
            xs[i], ys[i] = random_crop(page, mask, crop, self.rng)
        return xs, ys


def random_crop(page: np.ndarray, mask: np.ndarray, crop: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop x crop window (padded with the page's edge where the page is smaller)."""
    h, w = mask.shape
    if h < crop or w < crop:
        ph, pw = max(0, crop - h), max(0, crop - w)
        page = cv2.copyMakeBorder(page, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
        mask = np.pad(mask, ((0, ph), (0, pw)))
        h, w = mask.shape
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return page[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
