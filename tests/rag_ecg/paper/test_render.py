"""Renderer geometry measured from the pixels, on real PTB-XL (NU, 100 Hz) and LUDB (mV, 500 Hz) records."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rag_ecg.config import read_yaml
from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.paper.layout import LAYOUTS, RenderConfig, random_config
from rag_ecg.paper.render import render_page, render_record

BARE = dict(header=False, labels=False, separators=False)  # only grid, traces and pulses on the page


def _ink(img) -> np.ndarray:
    """Trace/text pixels: dark in every channel (grid inks keep at least one channel light)."""
    return np.asarray(img).max(axis=2) < 110


def _line_centres(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres and strengths of the peaks (grid lines) of a 1-D ink profile."""
    base = np.median(profile)
    thr = base + 0.25 * (np.percentile(profile, 99) - base)
    above = np.flatnonzero(np.diff(np.r_[0, (profile > thr).astype(np.int8), 0]))
    centres, strength = [], []
    for s, e in zip(above[0::2], above[1::2]):
        w = profile[s:e] - base
        centres.append(s + float((w * np.arange(e - s)).sum() / w.sum()) + 0.5)
        strength.append(float(w.max()))
    return np.asarray(centres), np.asarray(strength)


def _pitch(centres: np.ndarray) -> float:
    """Least-squares spacing of regularly spaced lines (integer steps from the median gap)."""
    rough = np.median(np.diff(centres))
    k = np.r_[0, np.cumsum(np.round(np.diff(centres) / rough))]  # each gap counted in whole steps
    return float(np.polyfit(k, centres, 1)[0])


@pytest.mark.parametrize("dpi", [100, 200, 300])
@pytest.mark.parametrize("axis", [0, 1])
def test_grid_pitch_is_one_mm_and_major_five_mm(ptb, dpi, axis):
    res = render_record(ptb, RenderConfig(dpi=dpi, grid_color="red", **BARE))
    px_mm = dpi / 25.4
    assert res.px_per_mm == pytest.approx(px_mm)
    x0, y0, x1, y1 = res.grid_box
    arr = np.asarray(res.image).astype(np.float64)[y0:y1, x0:x1]
    grid_ink = 255.0 - arr[:, :, 1]  # red/pink ink removes green
    grid_ink[_ink(res.image)[y0:y1, x0:x1]] = np.nan  # leave the traces out
    profile = np.nanmean(grid_ink, axis=axis)
    centres, strength = _line_centres(profile)
    assert len(centres) > 100
    assert _pitch(centres) == pytest.approx(px_mm, rel=0.004)
    major = centres[strength > 0.5 * (strength.max() + np.median(strength))]
    assert len(major) > 20
    assert _pitch(major) == pytest.approx(5 * px_mm, rel=0.004)


@pytest.mark.parametrize("gain,speed", [(10.0, 25.0), (5.0, 25.0), (20.0, 50.0)])
def test_calibration_pulse_is_1mv_tall_and_200ms_wide(ptb, gain, speed):
    cfg = RenderConfig(dpi=200, gain_mm_mv=gain, speed_mm_s=speed, grid_color="none", **BARE)
    res = render_record(ptb, cfg)
    ink = _ink(res.image)
    assert len(res.calibration) == 4  # one per row of 3x4+II
    for bx0, by0, bx1, by1 in res.calibration:
        pulse = ink[by0:by1, bx0:bx1]
        rows = pulse.sum(axis=1).astype(float)
        ys = np.arange(pulse.shape[0])
        half = pulse.shape[0] // 2

        def level(r, y):  # centre of the horizontal stroke: rows holding most of the ink of that half
            r = r * (r > 0.5 * r.max())
            return (r * y).sum() / r.sum()

        top, bottom = level(rows[:half], ys[:half]), level(rows[half:], ys[half:])
        assert (bottom - top) / res.px_per_mm == pytest.approx(gain, abs=0.15)  # 1 mV = gain mm
        cols = pulse.sum(axis=0).astype(float)
        tall = np.flatnonzero(cols > 0.6 * cols.max())
        edges = [tall[tall < tall.mean()].mean(), tall[tall > tall.mean()].mean()]
        assert (edges[1] - edges[0]) / res.px_per_mm == pytest.approx(0.2 * speed, abs=0.15)  # 200 ms


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["ptb", "ludb"])
def test_each_trace_is_drawn_where_its_signal_says_inside_its_box(which, layout, request):
    rec = request.getfixturevalue(which)
    cfg = RenderConfig(layout=layout, dpi=150, grid_color="none", gain_mm_mv=5.0 if layout == "12x1" else 10.0, **BARE)
    res = render_record(rec, cfg)
    ink = _ink(res.image)
    h, w = ink.shape
    sig = rec.signal_mv()
    px_s, px_mv = res.px_per_mm * cfg.speed_mm_s, res.px_per_mm * cfg.gain_mm_mv
    allowed = np.zeros_like(ink)
    for b in res.leads:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        allowed[y0:y1, x0:x1] = True
        col = sig[:, rec.leads.index(b.lead)]
        misses = 0
        ts = np.arange(b.t_start + 0.05, b.t_end - 0.05, 0.05)
        for t in ts:
            x = int(x0 + (t - b.t_start) * px_s)  # the box starts within half a pixel of the exact start
            y = np.clip(b.baseline_y - col[int(round(t * rec.fs))] * px_mv, y0, y1 - 1)
            dark = np.flatnonzero(ink[y0:y1, x - 1:x + 2].any(axis=1)) + y0
            if dark.size == 0 or np.abs(dark - y).min() > 2.5:
                misses += 1
        assert misses <= 0.02 * len(ts), f"{b.lead}: {misses}/{len(ts)} samples not drawn where expected"
    for b in res.calibration:
        allowed[b[1]:b[3], b[0]:b[2]] = True
    assert not (ink & ~allowed).any(), "ink outside the lead boxes and calibration pulses"


@pytest.mark.parametrize("layout,n_rows,n_cols", [("3x4", 3, 4), ("3x4+II", 4, 4), ("6x2", 6, 2), ("12x1", 12, 1)])
def test_layouts_hold_all_twelve_leads_in_their_windows(ptb, layout, n_rows, n_cols):
    res = render_record(ptb, RenderConfig(layout=layout, dpi=100))
    main = [b for b in res.leads if not b.rhythm]
    assert sorted(b.lead for b in main) == sorted(STANDARD_LEADS)
    rhythm = [b for b in res.leads if b.rhythm]
    assert len(rhythm) == (1 if layout == "3x4+II" else 0)
    assert len({b.box[1] for b in res.leads}) == n_rows
    col_s = 10.0 / n_cols  # 10 s record, 250 mm of trace at 25 mm/s
    for b in main:
        assert b.t_end - b.t_start == pytest.approx(col_s, abs=1e-6)
        assert (b.box[2] - b.box[0]) == pytest.approx(col_s * 25 * res.px_per_mm, abs=2.0)
    assert {round(b.t_start, 3) for b in main} == {round(i * col_s, 3) for i in range(n_cols)}
    for r in rhythm:
        assert (r.lead, r.t_start, r.t_end) == ("II", 0.0, 10.0)
    for i, a in enumerate(main):  # boxes of different leads never overlap
        for b in main[i + 1:]:
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_speed_50_prints_five_seconds(ptb):
    res = render_record(ptb, RenderConfig(speed_mm_s=50.0, layout="3x4", dpi=100))
    assert max(b.t_end for b in res.leads) == pytest.approx(5.0)


def test_same_seed_same_bytes_and_seed_matters(ptb):
    a = render_page(ptb, "random", seed=11, dpi=60)
    b = render_page(ptb, "random", seed=11, dpi=60)
    c = render_page(ptb, "random", seed=12, dpi=60)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert render_page(ptb, "clean", dpi=60).tobytes() == render_page(ptb, "clean", dpi=60).tobytes()


def test_random_configs_are_valid_and_varied():
    rng = np.random.default_rng(0)
    cfgs = [random_config(rng, dpi=100).validate() for _ in range(60)]
    # 6x2 + a rhythm strip is drawn on request only: random pages (the fitted probabilities' and benchmarks' pages)
    # keep the layouts they were made with
    assert {c.layout for c in cfgs} == set(LAYOUTS) - {"6x2+II"}
    assert len({c.grid_color for c in cfgs}) >= 4
    assert all(c.dpi == 100 for c in cfgs)


def test_save_writes_image_and_layout_json_atomically(ptb, tmp_path):
    res = render_record(ptb, RenderConfig(dpi=80, layout="6x2"))
    out = res.save(tmp_path / "page.png")
    meta = json.loads((tmp_path / "page.json").read_text())
    assert meta["image_size"] == list(res.image.size) and meta["layout"] == "6x2"
    assert meta["px_per_mm"] == pytest.approx(80 / 25.4)
    assert [d["lead"] for d in meta["leads"]] == [b.lead for b in res.leads]
    assert meta["heart_rate"] == pytest.approx(res.heart_rate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.json", "page.png"]  # no temp files left
    assert Image.open(out).size == res.image.size


def test_config_from_yaml_mapping_and_clear_errors(tmp_path):
    p = tmp_path / "render.yaml"
    p.write_text("layout: 6x2\ngain_mm_mv: 5\ngrid_color: green\ntrace_color: [10, 20, 30]\n")
    cfg = RenderConfig.from_dict(read_yaml(p))
    assert (cfg.layout, cfg.gain_mm_mv, cfg.grid_color, cfg.trace_color) == ("6x2", 5, "green", (10, 20, 30))
    with pytest.raises(ValueError, match=r"RenderConfig.layout: '5x5' is not one of"):
        RenderConfig(layout="5x5").validate()
    p.write_text("colour: red\n")
    with pytest.raises(ValueError, match="unknown RenderConfig field"):
        RenderConfig.from_dict(read_yaml(p))
    with pytest.raises(ValueError, match="grid_color"):
        RenderConfig(grid_color="purple").validate()
