"""Trace rows: where a page's rows of traces are, how far each runs, and the line each pen drew along it.

Works on an ink map (`ink.ink_map`, or a learned segmenter's trace map on the same 0-255 scale): rows are
heights where ink runs across most of the page, the largest evenly spaced set of them; per row the trace
is followed column by column.
"""
from __future__ import annotations

import cv2
import numpy as np

from rag_ecg.errors import InputError
from rag_ecg.paper.ink import INK_ON
from rag_ecg.paper.time_axis import tick_centre

MAX_INK_DENSITY = 0.15  # share of a page's trace area that may be ink (pen lines: ~2-6 %)
ROW_COUNTS = (3, 4, 6, 7, 12)  # trace rows of the layouts clinics print (7: 6x2 and a rhythm strip)
MAX_STRAY = 0.03  # share of a row (10 s) a trace may stay half a pitch off its baseline: 0.3 s (a QRS: 0.1 s)


class DigitizeError(InputError):
    """No ECG trace rows could be found on the page (a blank page, a photo of something else)."""


def row_sets(ink: np.ndarray) -> list[tuple[list[float], float]]:
    """Candidate trace rows, best first: the largest evenly spaced chain of across-page rows (baselines, px; and their pitch); when
    that is seven rows (6x2 and a strip, or a 6x2 page under a header line), the best chain of another count; then,
    when more rows lie near an evenly spaced line, those (see `_even_rows`). The caller confirms all but the first."""
    peaks, cover, min_gap = _row_peaks(ink)
    best = _chain(peaks, cover, min_gap)
    if best is None:
        raise DigitizeError("no readable ECG traces: no evenly spaced set of 3, 4, 6, 7 or 12 trace rows on the page")
    out = [(best, float(np.median(np.diff(best))))]
    if len(best) == 7 and (other := _chain(peaks, cover, min_gap, tuple(n for n in ROW_COUNTS if n != 7))):
        out.append((other, float(np.median(np.diff(other)))))
    even = _even_rows(peaks, cover, min_gap, len(best))
    return out + ([even] if even else [])


def _row_peaks(ink: np.ndarray) -> tuple[list[int], np.ndarray, int]:
    """(heights where ink runs across most of the page, the smoothed share of columns inked near each height, the
    least distance between two rows)."""
    h, w = ink.shape
    on = (ink > INK_ON).astype(np.uint8)
    band = max(3, int(round(w / 130)))  # ~2.3 mm: a trace near its (possibly tilted) baseline stays within this
    near = cv2.dilate(on, cv2.getStructuringElement(cv2.MORPH_RECT, (1, 2 * band + 1)))
    cover = near[:, int(0.1 * w):int(0.9 * w)].mean(axis=1)
    cover = cv2.GaussianBlur(cover.reshape(-1, 1).astype(np.float32), (1, 0), sigmaX=0, sigmaY=band).ravel()
    min_gap = max(8, int(0.035 * h))
    peaks = [y for y in range(1, h - 1)
             if cover[y] >= 0.3 and cover[y] == cover[max(0, y - min_gap):y + min_gap + 1].max()]
    if len(peaks) < 3:
        raise DigitizeError(f"no readable ECG traces: found {len(peaks)} trace row(s) across the page "
                            "(an ECG page has 3, 4, 6, 7 or 12)")
    return peaks, cover, min_gap


def _chain(peaks: list[int], cover: np.ndarray, min_gap: int,
           counts: tuple[int, ...] = ROW_COUNTS) -> list[float] | None:
    """The largest evenly spaced set of `peaks` (most ink on a tie), following a pitch that changes steadily."""
    best, best_key = None, None
    ys = np.asarray(peaks, np.float64)
    for i in range(len(ys)):
        for j in range(i + 1, len(ys)):
            pitch = ys[j] - ys[i]
            if pitch < min_gap:
                continue
            chain = [ys[i]]
            step, ratio = pitch, 1.0  # follows a changing pitch: a photo taken at an angle squeezes one end,
            while len(chain) < 12:  # by a steady ratio from row to row (perspective)
                # the next row where the pitch so far, or its trend, puts it (wrinkled paper: no steady trend)
                miss, k = min((abs(ys[j] - t), j) for t in (chain[-1] + step, chain[-1] + step * ratio)
                              for j in [int(np.argmin(np.abs(ys - t)))])
                if miss > max(3.0, 0.2 * step) or ys[k] <= chain[-1]:
                    break
                new_step = ys[k] - chain[-1]
                ratio = float(np.clip(new_step / step, 0.75, 1.33)) if len(chain) > 1 else 1.0
                step = new_step
                chain.append(ys[k])
            for n in sorted(counts, reverse=True):
                if len(chain) >= n:
                    rows = chain[:n]
                    key = (n, float(sum(cover[int(y)] for y in rows)))
                    if best_key is None or key > best_key:
                        best, best_key = rows, key
                    break
    return [float(y) for y in best] if best is not None else None


def _even_rows(peaks: list[int], cover: np.ndarray, min_gap: int, found: int) -> tuple[list[float], float] | None:
    """More rows than the chain `found` (4-6: a 3x4 block and its rhythm strips), consecutive peaks each within a
    fifth of a pitch of an evenly spaced line. Why: a trace's ink sits where its baseline wanders to, not where
    the printer put the row (GE pages: a quarter pitch off), so the chain, which steps from row to row, breaks,
    while the rows' line through all of them holds. Such a set may also be a header line taken for a row: the
    caller keeps it only when it adds rows between the chain's and reads as a block and strips (`row_read`)."""
    ys = np.asarray(peaks, np.float64)
    for n in range(6, found, -1):
        if n not in (4, 5, 6):
            continue
        fits = []
        for i in range(len(ys) - n + 1):
            run = ys[i:i + n]
            slope, icpt = np.polyfit(np.arange(n), run, 1)
            if slope < min_gap or np.diff(run).min() < 0.6 * slope:
                continue
            if np.abs(run - (icpt + slope * np.arange(n))).max() <= 0.2 * slope:
                fits.append((float(sum(cover[int(y)] for y in run)), [float(y) for y in run], float(slope)))
        if fits:
            _, rows, pitch = max(fits)
            return rows, pitch
    return None


def trace_extent(ink: np.ndarray, rows: list[float], pitch: float) -> list[tuple[int, int]]:
    """Per row, its first and last trace column (px), calibration pulse excluded.

    A row's trace is the longest run of inked columns (gaps under ~1.5 mm bridged): page edges, stamps
    and grid remnants beside it are not part of it. A printed calibration pulse ends a little before
    the trace starts: the first run of empty columns within the first 8 % of the row marks the
    trace's start. Rows are measured one by one because a photographed page is a trapezoid (rows
    start and end at different columns); a row much shorter than the others (a faded or clipped
    trace) takes the rows' median extent instead.
    """
    h, w = ink.shape
    half = max(2, int(0.45 * pitch))
    bridge = max(3, w // 60)
    found: list[tuple[int, int] | None] = []
    for y in rows:
        a, b = max(0, int(y) - half), min(h, int(y) + half + 1)
        cols = (ink[a:b] > INK_ON).any(axis=0)
        run = _longest_run(cv2.dilate(cols.astype(np.uint8).reshape(1, -1), np.ones((1, bridge), np.uint8)).ravel() > 0)
        if run is None:
            found.append(None)
            continue
        left, right = run[0] + bridge // 2, run[1] - bridge // 2
        window = cols[left:left + int(0.08 * (right - left))]
        gap = np.flatnonzero(~window)
        if gap.size:  # the trace starts where the first gap after the pulse ends
            after = np.flatnonzero(window[gap[0]:])
            if after.size:
                left += int(gap[0] + after[0])
        found.append((int(left), int(right)))
    good = [f for f in found if f is not None]
    if not good:
        raise DigitizeError("trace rows hold no ink")
    med = (int(np.median([f[0] for f in good])), int(np.median([f[1] for f in good])))
    length = med[1] - med[0]
    found = [f if f is not None and f[1] - f[0] >= 0.85 * length else med for f in found]
    return [(_in_line(found, r, 0, length), _in_line(found, r, 1, length)) for r in range(len(found))]


def _in_line(extents: list[tuple[int, int]], r: int, side: int, length: int) -> int:
    """Row r's start (side 0) or end (1), or the other rows' median when they all agree within 1 % of the row and
    row r lies over 1.5 % outside them: a calibration pulse whose top merged with the grid's border line (GE)
    loses that top with the border and is then read as the trace's start, 200 ms early."""
    others = [e[side] for i, e in enumerate(extents) if i != r]
    if len(others) < 2 or max(others) - min(others) > 0.01 * length:
        return extents[r][side]
    if min(others) - 0.015 * length <= extents[r][side] <= max(others) + 0.015 * length:
        return extents[r][side]
    return int(np.median(others))


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True, or None."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    if starts.size == 0:
        return None
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k])


def follow_trace(ink: np.ndarray, base: float, pitch: float, x0: int, x1: int, neighbours: tuple[float, ...] = (),
                 glyphs: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """(trace height above the baseline (px, up positive) at each column x0..x1 of one row, continuity, peaks).

    Per column the ink runs inside the row's band are found; the one nearest the previous point is the
    trace, and of that run the end farther from the previous point is taken (a run spans where the pen
    came from to where it went). A run farther than a quarter pitch away is a label, a neighbour's
    spike or a stamp, not this trace: such columns, and empty ones, carry the previous point, as do runs
    crossing the whole band (a printed column rule: following it leads up into the next row or the header).
    Continuity is the share of columns whose run touches the previous point (a pen line: ~1). A trace led off its
    row (half a pitch away for longer than MAX_STRAY of the row: a shadow's rim, a stamp) goes back to a run on the
    baseline, or to the baseline itself when there is no ink to follow out there; so does one that stays on a
    neighbouring row's baseline (`neighbours`, px) for longer than a QRS tip passes it (rows closer than the band
    reaches: a GE page's rhythm strips, whose tall R waves meet the strip above). A lead label's letter is
    followed only when no other ink is near (`glyphs`, `glyph_map`'s page): at a switch between leads the pen jumps,
    and the letter below is often nearer than the next lead's line.
    A column's height is its run's middle, except at a peak (the run's top above both neighbours' tops) or a
    trough, where it is that end less half a pen width: a thin pen's QRS turns inside one or two columns, and
    the middle of such a run halves the spike. `peaks` flags those columns, so resampling can keep them.
    """
    h, w = ink.shape
    top = max(0, int(round(base - 0.75 * pitch)))
    bot = min(h, int(round(base + 0.75 * pitch)) + 1)
    on = (ink[top:bot, x0:x1 + 1] > INK_ON).T.astype(np.int8)  # (columns, rows)
    n_cols = on.shape[0]
    padded = np.zeros((n_cols, on.shape[1] + 2), np.int8)
    padded[:, 1:-1] = on
    edges = np.diff(padded, axis=1)
    sc, sr = np.nonzero(edges == 1)  # row-major: sorted by column, then row
    ec, er = np.nonzero(edges == -1)
    bounds = np.searchsorted(sc, np.arange(n_cols + 1)).tolist()
    starts, ends = sr.tolist(), (er - 1).tolist()
    glyph = (glyphs[top + sr, x0 + sc] if glyphs is not None else np.zeros(len(sc), bool)).tolist()
    jump = 0.25 * pitch
    max_stray = int(MAX_STRAY * (x1 - x0))  # columns a trace may stay half a pitch off its baseline (~0.3 s)
    others = [float(y - top) for y in neighbours if abs(y - base) < 0.75 * pitch + 0.2 * pitch]
    max_on_other = max(2, int(0.006 * (x1 - x0)))  # 60 ms of a 10-s row: an R wave's tip passes a line faster
    on_other = 0
    last = on.shape[1] - 1
    run_s, run_e = [0.0] * n_cols, [0.0] * n_cols
    prev = zero = float(base - top)
    locked = False
    touching = stray = 0
    for x in range(n_cols):
        best, best_d = -1, (jump if locked else float(on.shape[1]))
        for k in range(bounds[x], bounds[x + 1]):
            s, e = starts[k], ends[k]
            if s == 0 and e == last:  # a line across the whole band (a column rule, a box edge): not a pen trace
                continue
            d = s - prev if s > prev else (prev - e if e < prev else 0.0)
            d += 0.5 * jump * glyph[k]  # a label's letter beside the trace is taken only if nothing else is near
            if d <= best_d:
                best, best_d = k, d
        stray = stray + 1 if abs(prev - zero) > 0.5 * pitch else 0
        on_other = on_other + 1 if any(abs(prev - y) < 0.2 * pitch for y in others) else 0
        if on_other > max_on_other:  # following the next row's line: as led off the row
            stray, on_other = max_stray + 1, 0
        if stray > max_stray:  # led off the row (a shadow's edge, a stamp): back to a run on the baseline
            for k in range(bounds[x], bounds[x + 1]):
                s, e = starts[k], ends[k]
                d = s - zero if s > zero else (zero - e if e < zero else 0.0)
                if d <= jump and not (s == 0 and e == last):
                    best, best_d, stray = k, abs(prev - zero), 0  # a jump back: not a touching run
                    break
        if best >= 0:
            touching += best_d <= 1.0
            locked = True
            s, e = starts[best], ends[best]
            run_s[x], run_e[x] = float(s), float(e)
            if e - s <= 2:
                prev = 0.5 * (s + e)
            else:
                prev = float(s) if abs(s - prev) > abs(e - prev) else float(e)
        else:
            if stray > max_stray:  # nothing to follow out there: the baseline is the better guess
                prev, stray = zero, 0
            run_s[x] = run_e[x] = prev
    top_y, bot_y = np.asarray(run_s, np.float32), np.asarray(run_e, np.float32)
    y, peaks = _column_heights(top_y, bot_y)
    return (base - top) - y, touching / max(1, n_cols), peaks  # up is positive, as on paper


def glyph_map(ink: np.ndarray, pitch: float, row_length: int) -> np.ndarray:
    """(H, W) bool: ink of blobs the size of a printed letter (0.5-3 % of a row long, under a quarter pitch high,
    about as high as long): a lead's label; not a trace, which runs on for seconds, nor a piece of a faint trace
    (long and flat) or of a QRS stroke (narrower or taller). One pass over the page (`follow_trace` uses it)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((ink > INK_ON).astype(np.uint8), connectivity=8)
    long, tall = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    small = (long >= 0.005 * row_length) & (long < 0.03 * row_length) & (tall < 0.25 * pitch) & (tall >= 0.6 * long)
    small[0] = False
    return small[labels]


def _column_heights(top_y: np.ndarray, bot_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pen centre y per column, peak/trough flags) from each column's chosen ink run [top_y, bot_y].

    A column's run is the pen centre line's whole range over the pen's width around the column (a max and a min
    filter of the line), so the run's middle leads the line where a flat stretch turns steep (the start of a QRS
    reads early). The line is recovered morphologically: eroding the run's top (less half a pen) by the pen's
    half width gives the line's closing, dilating its bottom its opening; both equal the line wherever it runs
    one way, the closing keeps the peaks, the opening the troughs."""
    y = 0.5 * (top_y + bot_y)
    if y.size < 3:
        return y, np.zeros(y.size, bool)
    pen = float(np.median(bot_y - top_y))  # the pen's width where the line runs flat
    tall = bot_y - top_y > pen + 1.5
    peak = _turns(top_y, tall)
    trough = _turns(-bot_y, tall) & ~peak
    k = int(np.floor(0.5 * pen + 0.5))  # the pen's half width, columns (pen: its thickness less one px)
    if k:
        win = np.ones((1, 2 * k + 1), np.uint8)
        hi = (top_y + 0.5 * pen).astype(np.float32).reshape(1, -1)  # the line's highest point near each column
        lo = (bot_y - 0.5 * pen).astype(np.float32).reshape(1, -1)
        closing = cv2.dilate(hi, win, borderType=cv2.BORDER_REPLICATE).ravel()  # image y: dilate = lower on paper
        opening = cv2.erode(lo, win, borderType=cv2.BORDER_REPLICATE).ravel()
        near = np.ones(2 * k + 3, np.float32)
        near_peak = np.convolve(peak.astype(np.float32), near, "same") > 0
        near_trough = np.convolve(trough.astype(np.float32), near, "same") > 0
        y = np.where(near_peak & ~near_trough, closing, np.where(near_trough & ~near_peak, opening,
                                                                    0.5 * (closing + opening)))
    y = np.where(peak, top_y + 0.5 * pen, np.where(trough, bot_y - 0.5 * pen, y)).astype(np.float32)
    return y, peak | trough


def _turns(top: np.ndarray, tall: np.ndarray) -> np.ndarray:
    """The middle column of each peak of `top` (image y: smaller is higher): a run of columns level within half a
    pixel whose neighbours on both sides are lower, one of its columns' runs taller than the pen (`tall`). A pen's
    tip is as wide as the pen, so a spike's top spans 2-4 columns of equal height: one turn, not one per side
    (which read as a notch in the middle of a QRS)."""
    n = top.size
    starts = np.flatnonzero(np.r_[True, np.abs(np.diff(top)) > 0.5])  # runs of columns level with the previous
    ends = np.r_[starts[1:], n] - 1
    lo = np.minimum.reduceat(top, starts)
    left = np.where(starts > 0, top[np.maximum(starts - 1, 0)], np.inf)
    right = np.where(ends < n - 1, top[np.minimum(ends + 1, n - 1)], np.inf)
    turn = (left > lo) & (right > lo) & (np.maximum.reduceat(tall, starts) > 0) & (ends - starts < n - 1)
    out = np.zeros(n, bool)
    out[(starts[turn] + ends[turn]) // 2] = True
    return out


def check_line_drawing(ink: np.ndarray, rows: list[float], pitch: float, x0: int, x1: int) -> None:
    """Trace rows are thin lines on paper: a few per cent of their band is ink. A photo of something
    else (texture, noise, a dense picture) inks far more of it; refuse it rather than read noise."""
    top = max(0, int(rows[0] - 0.45 * pitch))
    bot = min(ink.shape[0], int(rows[-1] + 0.45 * pitch) + 1)
    density = float((ink[top:bot, x0:x1 + 1] > INK_ON).mean()) if x1 > x0 else 1.0
    if density > MAX_INK_DENSITY or x1 - x0 < 0.3 * ink.shape[1]:
        raise DigitizeError(f"no readable ECG traces: {density:.0%} of the trace area is ink, "
                            f"traces span {x1 - x0} of {ink.shape[1]} columns")


def pulse_columns(trace: np.ndarray, pitch: float) -> tuple[int, int]:
    """(columns to drop at the start, at the end) of a followed row for a calibration pulse printed joined to its
    trace (ECG-Image-Kit and several machines draw the pulse, then the trace with no gap: `trace_extent`'s gap
    rule cannot see it). A pulse is a flat top well above the baseline, 1-6 % of the row long, rising within the
    row's first 3 %; ECG waves are not flat that long that high."""
    return _pulse_at_start(trace, pitch), _pulse_at_start(trace[::-1], pitch)


def _pulse_at_start(t: np.ndarray, pitch: float) -> int:
    n = t.size
    if n < 100:
        return 0
    win = t[:int(0.1 * n)]
    first = np.flatnonzero(win > 0.12 * pitch)
    if first.size == 0 or first[0] > 0.03 * n:
        return 0
    s = int(first[0])
    level = float(np.median(win[s:s + max(3, int(0.01 * n))]))
    if level <= 0.12 * pitch:
        return 0
    low = np.convolve((win[s:] < 0.3 * level).astype(np.int8), np.ones(3, np.int8), "valid") == 3
    if not low.any():
        return 0
    fall = s + int(np.argmax(low))  # the plateau ends where the trace stays down for 3 columns
    top = win[s:fall]
    flat = np.abs(top - level) <= max(1.5, 0.06 * level)
    if not 0.01 * n <= top.size <= 0.06 * n or flat.mean() < 0.7:
        return 0
    return fall + 1


def separator_columns(ink: np.ndarray, base: float, pitch: float, a: int, b: int,
                      n_cols: int) -> list[tuple[int, int, int, float | None]]:
    """(boundary k of the row's n_cols columns, first and last column (inclusive, page px), sub-pixel centre) of the
    vertical ticks some printers draw where a row switches lead: a stroke crossing the baseline both ways right at
    a column boundary. Following the trace there would turn the tick into a spike in the next lead, so the caller
    bridges these columns; the centres mark the switch's time (`time_axis`)."""
    h = ink.shape[0]
    reach = max(2, int(round(0.03 * pitch)))  # ticks run 1-3 mm each way (pitch: 15-60 mm)
    lo, hi = max(0, int(round(base - reach))), min(h, int(round(base + reach)) + 1)
    half = max(2, int(round(0.006 * (b - a))))
    spans = []
    for c in range(1, n_cols):
        xb = int(round(a + (b - a) * c / n_cols))
        cols = [x for x in range(max(a, xb - half), min(b, xb + half) + 1) if (ink[lo:hi, x] > INK_ON).all()]
        if cols:  # the stroke nearest the boundary (a QRS crossing the baseline beside the tick is not part of it)
            groups = np.split(np.asarray(cols), np.flatnonzero(np.diff(cols) > 1) + 1)
            g = min(groups, key=lambda g: min(abs(g[0] - xb), abs(g[-1] - xb)))
            span = (int(g[0]) - 1, int(g[-1]) + 1)
            spans.append((c, *span, tick_centre(ink, base, reach, span)))
    return spans


def pulse_sides(ink: np.ndarray, rows: list[float], pitch: float, extents: list[tuple[int, int]]) -> tuple[int, int]:
    """(rows with a pulse standing up at their start, rows with one hanging down at their end): a page that lies
    upside down shows its calibration pulses at the rows' right ends, pointing down. A pulse's top is a straight
    horizontal stroke 200 ms long well off the baseline; ECG waves do not draw one that long and level."""
    up = down = 0
    h, w = ink.shape
    on = ink > INK_ON
    for y, (a, b) in zip(rows, extents):
        span = b - a
        need = max(4, int(0.007 * span))  # 70 ms of a 10-s row: pulse tops are 80-200 ms long
        left = on[:, max(0, a - int(0.06 * span)):min(w, a + int(0.04 * span))]
        right = on[:, max(0, b - int(0.04 * span)):min(w, b + int(0.06 * span))]
        up += _level_stroke(left, y, pitch, need, above=True)
        down += _level_stroke(right, y, pitch, need, above=False)
    return up, down


def _level_stroke(region: np.ndarray, base: float, pitch: float, need: int, above: bool) -> bool:
    """Whether `region` (a strip of the ink mask) holds a horizontal run of `need` columns on one image row between
    0.1 and 0.45 pitch above (or below) the baseline (farther is the next row's territory)."""
    if region.shape[1] < need:
        return False
    lo, hi = (base - 0.45 * pitch, base - 0.1 * pitch) if above else (base + 0.1 * pitch, base + 0.45 * pitch)
    lines = region[max(0, int(lo)):max(0, int(hi))]
    if lines.size == 0:
        return False
    run = cv2.erode(lines.astype(np.uint8), np.ones((1, need), np.uint8))
    return bool(run.any())
