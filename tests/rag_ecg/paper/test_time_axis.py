"""Sub-pixel reading: the time axis from the ticks between leads (`time_axis`), the paper's sideways bends from its
grid (`grid_warp`), a spike's flat tip read as one peak and a steep stroke's corners where the line turns
(`rows._column_heights`), and a deskew that the picture's own edges do not hold at 0 degrees (`ink.deskew_angle`)."""
from __future__ import annotations

import cv2
import numpy as np

from rag_ecg.paper.grid_warp import row_bends
from rag_ecg.paper.ink import deskew_angle
from rag_ecg.paper.rows import _column_heights
from rag_ecg.paper.time_axis import row_axes, tick_centre


def test_ticks_set_each_row_axis_and_tickless_rows_start_like_the_ticked_ones():
    extents = [(100, 1440), (101, 1440), (100, 1441)]
    ticks = [[(1, 435.3), (2, 770.3), (3, 1105.3)], [(1, 435.3), (3, 1105.3)], []]  # 335 px per column
    axes, ticked = row_axes(extents, ticks, [4, 4, 1], 1000)
    assert ticked
    for start, step in axes[:2]:
        assert abs(start - 100.3) < 1e-6 and abs(step - 1.34) < 1e-6
    offset = np.median([100.3 - 100, 100.3 - 101])
    assert abs(axes[2][0] - (100 + offset)) < 1e-6 and abs(axes[2][1] - 1.34) < 1e-6


def test_a_tick_far_off_the_traced_extent_is_not_used():
    axes, ticked = row_axes([(100, 1440)], [[(1, 900.0)]], [4], 1000)  # a QRS 470 px from the boundary
    assert not ticked and axes == [(100.0, 1.34)]


def test_tick_centre_is_sub_pixel():
    ink = np.zeros((60, 40), np.uint8)
    ink[10:50, 20:23] = 255
    ink[10:50, 23] = 128  # anti-aliased right edge: the centre lies right of 21
    x = tick_centre(ink, 30.0, 15, (19, 24))
    assert 21.05 < x < 21.4


def test_grid_bends_are_read_from_the_grid_lines_phase():
    ppm, w = 5.4, 1600
    xs = np.arange(w, dtype=np.float64)
    bend = 1.5 * np.sin(2 * np.pi * xs / 500)  # px the paper moved right
    lines = np.zeros((100, w), np.float32)
    for k in np.arange(0, w, ppm):  # 1 mm lines, heavier every 5 mm, displaced by the bend at their column
        x = k + np.interp(k, xs, bend)
        i = int(np.floor(x))
        if 0 <= i < w - 1:
            wt = 40.0 if round(k / ppm) % 5 == 0 else 15.0
            lines[:, i] += wt * (1 - (x - i))
            lines[:, i + 1] += wt * (x - i)
    got = row_bends(lines, 50.0, 10.0, 100, 1500, ppm, True)
    assert got is not None
    cols, shift = got
    inside = (cols > 200) & (cols < 1400)
    trend = np.polyval(np.polyfit(cols, np.interp(cols, xs, bend), 1), cols)
    want = np.interp(cols, xs, bend) - trend
    assert np.abs(shift[inside] - want[inside]).max() < 0.35
    assert row_bends(np.zeros((100, w), np.float32), 50.0, 10.0, 100, 1500, ppm, True) is None


def _runs(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's ink run (top, bottom image rows) of a 3-px pen whose centre line is `centre` (one per column):
    the line's range over the column and its neighbours, widened by the pen."""
    c = np.pad(centre, 1, mode="edge")
    window = np.stack([c[:-2], c[1:-1], c[2:]])
    return window.min(0) - 1, window.max(0) + 1


def test_a_spike_with_a_flat_tip_is_one_peak():
    centre = np.full(40, 50.0, np.float32)
    centre[18:23] = [40, 25, 11, 30, 45]  # a QRS: its 3-px tip is level over three columns
    top, bot = _runs(centre)
    y, turns = _column_heights(top, bot)
    assert [c for c in np.flatnonzero(turns) if 15 <= c <= 25] == [20]  # one peak, not one per side of the tip
    assert y[20] == 11.0  # the tip less half the pen


def test_a_steep_rise_is_read_where_the_line_turns_not_a_pen_width_early():
    centre = np.full(40, 50.0, np.float32)
    centre[20:26] = [44, 38, 32, 26, 20, 14]  # a flat line turning into a steep rise after column 19
    top, bot = _runs(centre)
    assert 0.5 * (top[19] + bot[19]) == 47.0  # the run's middle: 3 px early
    y, _ = _column_heights(top, bot)
    assert np.abs(y[:25] - centre[:25]).max() <= 0.5


def test_the_pictures_own_edges_do_not_hold_the_deskew_at_zero():
    ink = np.zeros((900, 1600), np.uint8)
    for y in (200, 400, 600, 800):
        cv2.line(ink, (100, y), (1500, y), 255, 2)
    m = cv2.getRotationMatrix2D((800, 450), 0.4, 1.0)
    ink = cv2.warpAffine(ink, m, (1600, 900))
    ink[:3] = ink[-3:] = 255  # ink_map inks the picture's first and last rows right across
    assert abs(deskew_angle(ink) + 0.4) < 0.15
