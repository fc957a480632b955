"""Read a page's trace rows into 10-second traces: follow each row's pen, drop its calibration pulse, find the ticks
printed between its leads, and place its samples on the time axis.

Split out of `digitize` because a page's row count alone does not say its layout: six rows are a 6x2 page or a
3x4 page with three rhythm strips, and the two are told apart by reading the rows both ways (`strips`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rag_ecg.paper.ink import INK_ON
from rag_ecg.paper.layout import LEAD_ROWS
from rag_ecg.paper.rows import (
    DigitizeError,
    check_line_drawing,
    follow_trace,
    glyph_map,
    pulse_columns,
    pulse_sides,
    separator_columns,
    trace_extent,
)
from rag_ecg.paper.strips import layout_name, strip_names
from rag_ecg.paper.time_axis import row_axes

MIN_CONTINUITY = 0.6  # share of columns where a row's line must continue from the previous column
MIN_TICKED = 0.5  # share of a page's lead switches that must show a tick for its ticks to count (printers tick all)


@dataclass
class RowsRead:
    """The rows of one page read with a given number of printed columns per row."""

    rows: list[float]  # baselines, px
    pitch: float
    extents: list[tuple[int, int]]  # per row, first and last trace column (pulse trimmed), px
    traces: list[np.ndarray]  # per row, (n_samples,) height above the baseline (px, up positive) over 10 s
    axes: list[tuple[float, float]]  # per row, (column of sample 0, columns per sample)
    ticked: bool  # the ticks between leads placed the samples (else each row's inked extent did)
    pulses: tuple[int, int]  # rows starting with a pulse standing up, rows ending in one hanging down
    layout: str = ""  # what the rows are (`read_layout`)

    def keep(self, rows: list[int]) -> "RowsRead":
        """The read of these rows only (a strip that could not be named is left out, not read as some lead)."""
        pick = [self.extents, self.traces, self.axes]
        return RowsRead([self.rows[r] for r in rows], self.pitch, *[[p[r] for r in rows] for p in pick],
                        self.ticked, self.pulses, self.layout)


def read_layout(ink: np.ndarray, candidates: list[tuple[list[float], float]], rhythm_lead: str,
                n_samples: int) -> RowsRead:
    """The rows of the page read in the layout they show. `candidates` (`rows.row_sets`): the chain of rows, then
    maybe another chain (when the first has seven rows) and more rows near an even line, taken when some lie between
    the chain's rows (a GE page's wandering rows, of which the chain found every other one; rows found only above or
    below it are a header or a footer) and they read as a block and strips. Four rows: a 3x4 block and a strip,
    named from the traces (else `rhythm_lead`); six: a block and three strips or a 6x2 page (`strips.strip_names`);
    seven: 6x2 and a strip, named from the traces, else `rhythm_lead` unless the top row is a line of text (a header
    taken for a row: then the other chain); three and twelve: 3x4 and 12x1."""
    (rows, pitch), *more = candidates
    if len(rows) == 7:
        try:  # the strip named from the traces, or, when its top row is a trace (not a header line), assumed
            done = follow_rows(ink, rows, pitch)
            read = (_block_and_strips(ink, rows, pitch, n_samples, block="6x2", done=done)
                    or (None if _text_line(ink, rows[0], pitch) else
                        _block_and_strips(ink, rows, pitch, n_samples, rhythm_lead, "6x2", done)))
        except DigitizeError:
            read = None
        if read is not None or not more:
            return read or _plain(ink, rows[1:], pitch, n_samples)
        (rows, pitch), *more = more
    for more_rows, more_pitch in more:
        if not any(rows[0] < y < rows[-1] and min(abs(y - r) for r in rows) > 0.3 * more_pitch for y in more_rows):
            continue
        try:
            read = _block_and_strips(ink, more_rows, more_pitch, n_samples)
        except DigitizeError:
            continue
        if read is not None:
            return read
    done = follow_rows(ink, rows, pitch)  # six rows are read twice (block and strips, 6x2): followed once
    read = _block_and_strips(ink, rows, pitch, n_samples, rhythm_lead, done=done) if len(rows) in (4, 6) else None
    return read or _plain(ink, rows, pitch, n_samples, done)


def _text_line(ink: np.ndarray, y: float, pitch: float) -> bool:
    """Whether most ink near height `y` is in letter-sized blobs (`rows.glyph_map`): a header's line of text, not a
    trace (a trace's ink is one long stroke with its QRS complexes)."""
    band = ink[max(0, int(y - 0.3 * pitch)):int(y + 0.3 * pitch) + 1]
    on = band > INK_ON
    if not on.any():
        return True
    return bool(glyph_map(band, pitch, band.shape[1])[on].mean() > 0.5)


def _plain(ink: np.ndarray, rows: list[float], pitch: float, n_samples: int,
           done: Followed | None = None) -> RowsRead:
    """The rows read as the strip-less layout of their count: 3x4, 6x2 or 12x1."""
    layout = {3: "3x4", 6: "6x2"}.get(len(rows), "12x1")
    read = read_rows(ink, rows, pitch, [len(leads) for leads in LEAD_ROWS[layout]], n_samples, done)
    read.layout = layout
    return read


def _block_and_strips(ink: np.ndarray, rows: list[float], pitch: float, n_samples: int,
                      fallback: str | None = None, block: str = "3x4", done: Followed | None = None) -> RowsRead | None:
    """The rows read as a block (3x4: three rows; 6x2: six) and rhythm strips (strips not named left out), or None
    when they are not that (`strips.strip_names`) or no strip is named."""
    k = len(LEAD_ROWS[block])
    read = read_rows(ink, rows, pitch, [len(LEAD_ROWS[block][0])] * k + [1] * (len(rows) - k), n_samples, done)
    names = strip_names(read.traces[:k], read.traces[k:], fallback)
    if not names or not any(names):
        return None
    read = read.keep(list(range(k)) + [k + i for i, name in enumerate(names) if name is not None])
    read.layout = layout_name([name for name in names if name is not None], block)
    return read


@dataclass
class Followed:
    """A page's rows followed once, before it is known how many leads share each row: `read_rows` places them under
    each layout a page could be (six rows: a block and strips, or 6x2) without following the pen again."""

    extents: list[tuple[int, int]]  # per row, first and last trace column (pulse trimmed), px
    tracks: list[tuple[np.ndarray, float, np.ndarray]]  # per row, `rows.follow_trace`'s (trace, continuity, peaks)
    near: list[tuple[float, ...]]  # per row, its neighbours' baselines
    glyphs: np.ndarray  # `rows.glyph_map` of the page
    pulses: tuple[int, int]  # rows starting with a pulse standing up, rows ending in one hanging down


def follow_rows(ink: np.ndarray, rows: list[float], pitch: float) -> Followed:
    """Each row of `rows` followed across its traced extent, its calibration pulse dropped."""
    extents = trace_extent(ink, rows, pitch)
    check_line_drawing(ink, rows, pitch, *(int(np.median([e[i] for e in extents])) for i in (0, 1)))
    near = [tuple(rows[i] for i in (r - 1, r + 1) if 0 <= i < len(rows)) for r in range(len(rows))]
    glyphs = glyph_map(ink, pitch, int(np.median([b - a for a, b in extents])))
    tracks = [follow_trace(ink, y, pitch, a, b, nb, glyphs) for y, (a, b), nb in zip(rows, extents, near)]
    pulses = pulse_sides(ink, rows, pitch, extents)
    tracks, extents = _trim_pulses(tracks, extents, pitch)
    return Followed(extents, tracks, near, glyphs, pulses)


def read_rows(ink: np.ndarray, rows: list[float], pitch: float, n_cols: list[int], n_samples: int,
              done: Followed | None = None) -> RowsRead:
    """Each row of `rows` followed (or `done`: `follow_rows` of these rows) and resampled to `n_samples` over its
    10 s; `n_cols[r]` leads share row r."""
    done = done or follow_rows(ink, rows, pitch)
    extents, near, glyphs, pulses = done.extents, done.near, done.glyphs, done.pulses
    followed = list(done.tracks)  # a row followed again below (its ticks blanked) replaces its entry here only
    found = [separator_columns(ink, y, pitch, a, b, n) for y, (a, b), n in zip(rows, extents, n_cols)]
    if sum(map(len, found)) < MIN_TICKED * sum(n - 1 for n in n_cols):
        found = [[] for _ in rows]  # a QRS crossing the baseline at a column's start, not a printer's ticks
    ticks = [[(k, x) for k, _, _, x in seps if x is not None] for seps in found]
    for r, (y, (a, b), seps) in enumerate(zip(rows, extents, found)):
        if seps:  # blank the ticks and follow again: the pen is carried across, not led down a tick onto a label
            band = ink[max(0, int(y - pitch)):int(y + pitch) + 1].copy()
            for _, s, e, _ in seps:
                band[:, max(0, s):e + 1] = 0
            shift = max(0, int(y - pitch))
            trace, cont, peaks = follow_trace(band, y - shift, pitch, a, b, tuple(n - shift for n in near[r]),
                                              glyphs[shift:shift + band.shape[0]])
            for _, s, e, _ in seps:
                _bridge(trace, s - a, e - a)
            followed[r] = (trace, cont, peaks)
    continuity = float(np.median([f[1] for f in followed]))
    if continuity < MIN_CONTINUITY:
        raise DigitizeError(f"no readable ECG traces: the row lines are broken ({continuity:.0%} of columns continue "
                            "the line; pen traces are continuous)")
    axes, ticked = row_axes(extents, ticks, n_cols, n_samples)
    traces = [_resample(t, n_samples, peaks, start - a, step)
              for (t, _, peaks), (a, _), (start, step) in zip(followed, extents, axes)]
    return RowsRead(list(rows), pitch, extents, traces, axes, ticked, pulses)


def _trim_pulses(followed, extents, pitch):
    """Drop a calibration pulse printed joined to its trace from each followed row (`rows.pulse_columns`)."""
    out_f, out_e = [], []
    for (trace, cont, peaks), (a, b) in zip(followed, extents):
        s, e = pulse_columns(trace, pitch)
        if s or e:
            trace, peaks, a, b = trace[s:trace.size - e], peaks[s:peaks.size - e], a + s, b - e
        out_f.append((trace, cont, peaks))
        out_e.append((a, b))
    return out_f, out_e


def _bridge(trace: np.ndarray, s: int, e: int) -> None:
    """Replace trace[s..e] (inclusive), a tick between two leads, by its neighbours held up to its middle, in place:
    the leads either side are different signals, so a ramp between them would blend one into the other."""
    s, e = max(0, s), min(trace.size - 1, e)
    if e <= s:
        return
    mid = (s + e + 1) // 2
    trace[s:mid] = trace[max(0, s - 1)]
    trace[mid:e + 1] = trace[min(trace.size - 1, e + 1)]


def _resample(x: np.ndarray, n: int, peaks: np.ndarray, start: float, step: float) -> np.ndarray:
    """`x` (one value per column) at `n` samples, sample j at column `start + j * step` (`time_axis.row_axes`); each
    flagged peak column sets its nearest sample, so a spike one or two columns wide keeps its height (plain
    interpolation between columns would cut it)."""
    if x.size < 2:
        return np.zeros(n, np.float32)
    out = np.interp(start + np.arange(n) * step, np.arange(x.size), x).astype(np.float32)
    if peaks.any():
        cols = np.flatnonzero(peaks)
        j = np.rint((cols - start) / step).astype(int)
        ok = (j >= 0) & (j < n)
        out[j[ok]] = x[cols[ok]]
    return out
