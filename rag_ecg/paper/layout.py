"""What a paper-ECG page looks like: the render config, the lead layouts, page geometry and the result type.

Coordinates: pixels with (0, 0) at the top-left; a LeadBox is [x0, x1) x [y0, y1); times are seconds from
the start of the record; `px_per_mm = dpi / 25.4`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rag_ecg.config import from_dict
from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.data.images import save_image
from rag_ecg.errors import ConfigError
from rag_ecg.io import atomic_write

LAYOUTS = ("3x4", "3x4+II", "6x2", "6x2+II", "12x1")
GRID_COLORS = ("red", "pink", "green", "blue", "black", "none")
PAPERS: dict[str, tuple[float, float]] = {"a4": (297.0, 210.0), "letter": (279.4, 215.9)}  # landscape, mm

# Lead arrangement of each layout: rows of leads; each column is its own time window (as clinics print them).
LEAD_ROWS: dict[str, list[list[str]]] = {
    "3x4": [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]],
    "6x2": [["I", "V1"], ["II", "V2"], ["III", "V3"], ["aVR", "V4"], ["aVL", "V5"], ["aVF", "V6"]],
    "12x1": [[ld] for ld in STANDARD_LEADS],
}
LEAD_ROWS["3x4+II"] = LEAD_ROWS["3x4"]
LEAD_ROWS["6x2+II"] = LEAD_ROWS["6x2"]


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
    rhythm_lead: str = "II"  # lead of the bottom rhythm strip in "3x4+II" and "6x2+II"
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
        """Raise ConfigError (a ValueError) naming the field and the problem; return self when fine."""
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"RenderConfig.{name}: {why}")

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
        """A checked config from a mapping of its fields (unknown fields and bad values: ConfigError)."""
        return from_dict(cls, d, "RenderConfig").validate()


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
        save_image(self.image, path, **save_kwargs)
        if layout:
            atomic_write(path.with_suffix(".json"), json.dumps(self.layout_json(), indent=1))
        return path


# ---------------------------------------------------------------- page geometry


@dataclass
class Row:
    """One row of trace on the page (mm): its 0 mV line, its band, its leads left to right."""

    baseline_mm: float
    top_mm: float
    bottom_mm: float
    leads: list[str]
    rhythm: bool = False


@dataclass
class Geometry:
    """Where everything goes on a page of a given config, before any pixel is drawn."""

    ppm: float  # px per mm
    size: tuple[int, int]  # page (width, height), px
    grid_mm: tuple[float, float, float, float]  # x0, y0, x1, y1
    trace_x0_mm: float
    page_s: float  # seconds of record a full row shows
    rows: list[Row]


def page_geometry(cfg: RenderConfig, duration_s: float) -> Geometry:
    """The grid, the trace rows and the time span a page of `cfg` gives a record of `duration_s` seconds."""
    ppm = cfg.dpi / 25.4
    pw, ph = PAPERS[cfg.paper]
    header_mm = 4.2 * cfg.font_mm if cfg.header else 0.0
    gx0, gy0 = cfg.margin_mm, cfg.margin_mm + header_mm
    gw = math.floor((pw - 2 * cfg.margin_mm) / 5.0) * 5.0
    gh = math.floor((ph - gy0 - cfg.margin_mm) / 5.0) * 5.0
    if gw < 50 or gh < 50:
        raise ConfigError(f"RenderConfig: margins/header leave only {gw:g} x {gh:g} mm of grid")
    cal_mm = math.ceil((0.2 * cfg.speed_mm_s + 4.0) / 5.0) * 5.0 if cfg.calibration else 0.0
    trace_x0 = gx0 + cal_mm
    page_s = min(duration_s, min(cfg.trace_mm, gx0 + gw - trace_x0) / cfg.speed_mm_s)
    leads_rows = [list(r) for r in LEAD_ROWS[cfg.layout]]
    strip = cfg.layout.endswith("+II")  # a full-length rhythm strip (of cfg.rhythm_lead) under the leads
    n = len(leads_rows) + (1 if strip else 0)
    pitch = gh / n
    rows = [Row(gy0 + pitch * (i + 0.55), gy0 + pitch * i, gy0 + pitch * (i + 1), leads)
            for i, leads in enumerate(leads_rows)]
    if strip:
        i = n - 1
        rows.append(Row(gy0 + pitch * (i + 0.55), gy0 + pitch * i, gy0 + pitch * (i + 1),
                        [cfg.rhythm_lead], rhythm=True))
    size = (int(round(pw * ppm)), int(round(ph * ppm)))
    return Geometry(ppm, size, (gx0, gy0, gx0 + gw, gy0 + gh), trace_x0, page_s, rows)


# ---------------------------------------------------------------- random configs


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
