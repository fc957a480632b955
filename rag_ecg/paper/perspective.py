"""Perspective: a phone photo's page brought back to a flat, square-on rectangle before it is read.

Why: a page photographed at a slant shows its rows tilted by different angles and its time axis compressed towards
the far side; the digitiser stretches each row to 10 s and deskews by one angle, so a slanted page's QRS complexes
land up to a few hundred ms from where they belong (40 own `photo` pages of folds 1-8: 2.7 dB as they lie, 7.4 dB
flattened; the same pages drawn without the slant: 7.8 dB).

How: everything straight on ECG paper runs along one of two directions: grid lines, trace baselines, the page's and
the grid's edges. Under a homography each family of straight lines meets in a vanishing point, so the lines' angle
changes steadily across the page: the horizontal lines' from top to bottom, the vertical lines' from left to right.
That angle is measured in six bands per family (the deskew's sharpest-profile search, one band at a time), a
vanishing point is fitted to the bands that agree (five at least), and the homography that sends both points to
infinity along the axes is applied; the grid's pitch then sets the aspect (its squares are square on paper).
Only a perspective is corrected, never a skew or an aspect alone (lines fitted a few tenths of a degree off on a
flat page make one), and only where it moves the page by MIN_CORRECTION or more: a flat page (a scan, a rendering)
is read as it lies, pixel for pixel as before.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np

MIN_MAP_PX = 64  # a page whose quarter-size map is narrower than this either way is not measured (a sliver)
BANDS = 6  # bands per family: rows of the page for the horizontal lines, columns for the vertical ones
MAX_DEG = 10.0  # the angles searched, either way
COARSE_DEG = 1.0  # the slopes' first search step, over the whole map
STEP_DEG = 0.25  # the second, around each band's best
CHUNK = 10  # px of the line map summed into one profile before shearing
MIN_PROMINENCE = 4.0  # a band's best profile sharpness over its median over angles: the band shows lines
MIN_BANDS = 5  # bands per family whose lines must meet in one point: one band may be off (text, a stamp, the desk)
MAX_RESIDUAL_DEG = 0.15  # each band's lines miss the fitted vanishing point by at most this: they meet in one point
MIN_CORRECTION = 0.002  # the correction moves points of the page by this share of its width beyond an affine map
MAX_GROWTH = 1.6  # the rectified picture's bounding box over the working page's width: beyond, not believed
PAPER_CONTRAST = 30  # grey levels from the desk up to the paper, for the paper's edge to be cropped to
GRID_MAX_PX = 40  # the longest grid pitch looked for, working px (5 mm on a full page: ~27 px)
MAX_ASPECT = 1.15  # the grid's pitch down and across the flattened page differ by at most this factor
MIN_REPEAT = 0.25  # autocorrelation of a profile at its period, for a grid to show
EDGE_SPAN = 6  # px of the small map (~1.2 % of the page) over which the desk steps up to the paper


@dataclass
class Rectification:
    """The homography that flattens a working page (3x3, working px -> rectified px) and the rectified size."""

    matrix: np.ndarray
    size: tuple[int, int]  # (width, height) of the rectified page


def estimate(work: np.ndarray) -> Rectification | None:
    """The perspective correction of an (H, W, 3) uint8 working page, or None when the page looks flat (or the
    evidence is weak: too few bands show lines, or their angles do not meet in a vanishing point).

    The slant is measured on the page a quarter the size (a Gaussian pyramid: the 1 mm lines, unresolved there,
    blur away instead of folding into moire at other angles; own photo pages come out flat to within ~1 px of the
    page square-on). The rectified page is as wide as the working page, shows the paper alone where it stands out
    from the desk around it (the desk's edges, square-on, would look like rows of ink), else the whole picture, and
    its grid is square (`_grid_aspect`, measured at full size in the page's middle)."""
    h, w = work.shape[:2]
    small = cv2.pyrDown(cv2.pyrDown(work))
    sh, sw = small.shape[:2]
    if min(sh, sw) < MIN_MAP_PX:
        return None
    hom = _fit(line_map(small))
    if hom is None or _non_affinity(hom, sw, sh) < MIN_CORRECTION * sw:
        return None
    framed = _framed(hom, sw, sh)
    if framed is None:
        return None
    frame, size = framed
    x0, y0, x1, y1 = _paper_box(_warp(small, frame, size), _warp(np.ones((sh, sw), np.uint8), frame, size,
                                                                 cv2.INTER_NEAREST) > 0)
    z = w / (x1 - x0)
    # working px -> small (pyrDown keeps pixel 2i's centre as pixel i's) -> flattened -> the paper at full width
    out = np.array([[z, 0, -z * x0], [0, z, -z * y0], [0, 0, 1.0]]) @ frame @ np.diag([0.25, 0.25, 1.0])
    oh = max(8, int(round((y1 - y0) * z)))
    middle = np.array([[1.0, 0, -w / 4], [0, 1.0, -oh / 4], [0, 0, 1.0]]) @ out
    aspect = _grid_aspect(line_map(_warp(work, middle, (w // 2, oh // 2)))) or 1.0
    return Rectification(np.diag([1.0, 1.0 / aspect, 1.0]) @ out, (w, max(8, int(round(oh / aspect)))))


def _warp(img: np.ndarray, m: np.ndarray, size: tuple[int, int], flags: int = cv2.INTER_LINEAR) -> np.ndarray:
    """`img` warped by `m` into `size`, white (255) where it does not reach."""
    return cv2.warpPerspective(img, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=(255,) * (img.shape[2] if img.ndim == 3 else 1))


def rectify(work: np.ndarray, rect: Rectification) -> np.ndarray:
    """The working page flattened by `rect`, white where the picture does not reach. Cubic: a thin pen line resized
    and then warped linearly fades below the ink threshold in places (16 own photo pages: 6.2 dB, cubic 6.6 dB)."""
    return cv2.warpPerspective(work, rect.matrix, rect.size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=(255, 255, 255))


def line_map(small: np.ndarray) -> np.ndarray:
    """(h, w) float32 of a small RGB page: how much darker than its 5-px neighbourhood's brightest the darkest
    channel is. Grid lines of any colour, traces, text and the page's edge against a darker desk all show; flat
    areas (paper, desk) do not."""
    low = cv2.min(cv2.min(small[..., 0], small[..., 1]), small[..., 2])
    return cv2.subtract(cv2.dilate(low, np.ones((5, 5), np.uint8)), low).astype(np.float32)


def _paper_box(flat: np.ndarray, inside: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the paper on a small flattened page (`inside`: where the picture reaches): on each side,
    the innermost step from darker desk up to brighter paper (PAPER_CONTRAST within EDGE_SPAN px) in the outer 30 %
    of the brightness profile across that side (pen and grid closed over; light falls off too slowly to step), a
    little inside it; the frame's own edge on a side where no desk stands out."""
    bright = cv2.max(cv2.max(flat[..., 0], flat[..., 1]), flat[..., 2])
    bright = cv2.morphologyEx(bright, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8)).astype(np.float32)
    h, w = bright.shape
    box = []
    for axis, n in ((0, w), (1, h)):  # axis 0: the profile along x (columns), 1: along y (rows)
        inner = (slice(int(0.2 * h), int(0.8 * h)), slice(None)) if axis == 0 else (slice(None),
                                                                                   slice(int(0.2 * w), int(0.8 * w)))
        seen = inside[inner].sum(axis=axis)
        prof = (bright * inside)[inner].sum(axis=axis) / np.maximum(seen, 1)
        ok = seen > 0.5 * seen.max()
        prof = np.interp(np.arange(n), np.flatnonzero(ok), prof[ok]) if ok.any() else np.zeros(n)
        rise = np.zeros(n)  # how much brighter the profile is EDGE_SPAN px further in, from either end
        rise[:n - EDGE_SPAN] = prof[EDGE_SPAN:] - prof[:n - EDGE_SPAN]
        fall = np.zeros(n)
        fall[EDGE_SPAN:] = prof[:n - EDGE_SPAN] - prof[EDGE_SPAN:]
        outer = int(0.3 * n)  # the innermost strong step of each outer part: the paper's edge (further out: desk)
        lo = np.flatnonzero(rise[:outer] >= PAPER_CONTRAST)
        hi = np.flatnonzero(fall[n - outer:] >= PAPER_CONTRAST)
        inset = int(round(0.005 * n)) + 1
        box.append((int(lo[-1]) + EDGE_SPAN + inset if lo.size else 0,
                    n - outer + int(hi[0]) - EDGE_SPAN - inset if hi.size else n))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def _grid_aspect(lines: np.ndarray) -> float | None:
    """The grid's pitch down the page over its pitch across, on a line map of the flattened paper's middle; None
    where no grid shows. The vanishing points fix the page's directions, not its aspect: that is set from the
    picture's own at the page's centre, which a slanted camera squeezes (own photo pages: up to 11 %); the grid's
    squares are square on paper."""
    px = _period(lines.mean(axis=0), 4.0, GRID_MAX_PX)
    if px is None:
        return None
    py = _period(lines.mean(axis=1), px / MAX_ASPECT, px * MAX_ASPECT)
    return None if py is None else py / px


def _period(profile: np.ndarray, lo: float, hi: float) -> float | None:
    """The shortest period (px, between lo and hi) at whose multiples the profile's autocorrelation is high on
    average (a comb: a grid's fundamental can be weak in a profile its thicker lines or the traces dominate);
    None when no period repeats at MIN_REPEAT."""
    p = profile.astype(np.float64) - np.convolve(profile, np.ones(15) / 15, mode="same")
    n = p.size
    hi = min(hi, n / 6)  # at least two multiples within a third of the profile
    if hi <= lo:
        return None
    ac = np.correlate(p, p, "full")[n - 1:] / np.arange(n, 0, -1)
    ac = ac / max(ac[0], 1e-12)
    periods = np.arange(lo, hi, 0.02)
    m = np.arange(1, int(n / 3 / lo) + 1)
    at = periods[:, None] * m[None, :]
    comb = np.where(at <= n / 3, np.interp(at, np.arange(n), ac), np.nan)
    score = np.nanmean(comb, axis=1)
    if score.max() < MIN_REPEAT:
        return None
    first = int(np.argmax(score >= 0.9 * score.max()))  # the shortest period that repeats nearly as well as any
    end = first + int(np.argmax(score[first:] < 0.9 * score.max())) if (score[first:] < 0.9 * score.max()).any() \
        else score.size
    period = float(periods[first + int(np.argmax(score[first:end]))])
    m = int(n / 3 / period)  # refined where the repeat is measured longest: its last multiple's peak
    lo_j, hi_j = int(np.floor((m - 0.3) * period)), int(np.ceil((m + 0.3) * period))
    j = lo_j + int(np.argmax(ac[lo_j:hi_j + 1]))
    return (j + _peak_offset(ac[j - 1:j + 2])) / m if lo_j < j < hi_j else period


def _peak_offset(three: np.ndarray) -> float:
    """Where the parabola through three evenly spaced samples peaks, from the middle one (-0.5 .. 0.5)."""
    den = three[0] - 2 * three[1] + three[2]
    return float(np.clip(0.5 * (three[0] - three[2]) / den, -0.5, 0.5)) if den < 0 else 0.0


def band_slopes(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(BANDS, 3) per band: the slope that makes its lines sharpest, how much (prominence), and where they cross the
    map's centre line, for the horizontal family (bands of rows: dy/dx) and the vertical one (columns: dx/dy)."""
    return _sheared(lines), _sheared(lines.T)


def _sheared(lines: np.ndarray) -> np.ndarray:
    """Per band of rows of `lines`: the slope dy/dx whose sheared row profile is sharpest, its prominence, and the
    row (from the map's centre) around which that profile's sharp steps lie: where the lines it follows cross the
    map's centre column (a band's strongest lines, a page edge say, need not lie at its middle).

    The deskew's score (summed squared step of the row profile) per band and per slope, with shears instead of
    rotations: the map's columns are summed in chunks once, and a slope shifts the chunks' profiles by its rise
    across the map (the rows a line of that slope through the map's centre column crosses). The shifts are made in
    the Fourier domain (exact at any fraction of a pixel, where interpolating blurs every slope but zero; one
    polynomial per slope over the chunks). Chunks are narrow (CHUNK): a grid's lines repeat, and at a slope whose
    rise from one chunk to the next is half a pitch, every other chunk lines up with the grid as well as at the true
    slope. A band is the rows where the lines cross that column. Slopes are searched every COARSE_DEG over the whole
    map, then every STEP_DEG around each band's best."""
    h, w = lines.shape
    k = w // CHUNK
    dx = (np.arange(k) + 0.5) * CHUNK - 0.5 * w
    n = h + 2 * int(np.ceil(np.tan(np.radians(MAX_DEG + COARSE_DEG)) * 0.5 * w)) + 2  # zeros beyond the map
    spectra = np.fft.rfft(lines[:, :k * CHUNK].reshape(h, k, CHUNK).sum(axis=2), n=n, axis=0)  # (n // 2 + 1, k)
    omega = 2 * np.pi * np.arange(spectra.shape[0]) / n

    def steps(deg: np.ndarray, rows: slice) -> np.ndarray:  # (slopes, rows - 1) squared steps of the profiles
        slope = np.tan(np.radians(deg))[:, None]
        step = np.exp(1j * omega[None, :] * slope * CHUNK)  # chunk c shifts by slope * dx[c]: dx[0] + c * CHUNK
        shifted = np.zeros((deg.size, omega.size), complex)
        for c in range(k - 1, -1, -1):  # Horner: sum over c of spectra[:, c] * step ** c
            shifted = shifted * step + spectra[None, :, c]
        shifted *= np.exp(1j * omega[None, :] * slope * dx[0])
        return np.diff(np.fft.irfft(shifted, n=n, axis=1)[:, rows], axis=1) ** 2

    edges = [b * h // BANDS for b in range(BANDS + 1)]
    coarse = np.arange(-MAX_DEG, MAX_DEG + 1e-6, COARSE_DEG)
    every = steps(coarse, slice(0, h))
    out = np.zeros((BANDS, 3))
    for b in range(BANDS):
        score = every[:, edges[b]:edges[b + 1]].sum(axis=1)
        best = int(np.argmax(score))
        fine = coarse[best] + np.arange(-COARSE_DEG, COARSE_DEG + 1e-6, STEP_DEG)
        rows = np.arange(max(0, edges[b] - 1), min(h, edges[b + 1] + 1))
        band = steps(fine, slice(rows[0], rows[-1] + 1))
        i = int(np.argmax(band.sum(axis=1)))
        deg = fine[i] + (_peak_offset(band.sum(axis=1)[i - 1:i + 2]) * STEP_DEG if 0 < i < fine.size - 1 else 0.0)
        at = float((band[i] * (rows[:-1] + 0.5)).sum() / max(band[i].sum(), 1e-12))  # where its sharp lines are
        out[b] = np.tan(np.radians(deg)), score[best] / max(float(np.median(score)), 1e-9), at - 0.5 * h
    return out


def _band_lines(peaks: np.ndarray, h: int, w: int, horizontal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per band: the point where its lines cross the map's centre line and their direction (centred map px), and
    whether the band shows lines at all."""
    n = peaks.shape[0]
    t = peaks[:, 2]
    one, slope = np.ones(n), peaks[:, 0]
    pts = np.stack([0 * t, t], 1) if horizontal else np.stack([t, 0 * t], 1)
    dirs = np.stack([one, slope], 1) if horizontal else np.stack([slope, one], 1)
    return pts, dirs / np.linalg.norm(dirs, axis=1, keepdims=True), peaks[:, 1] >= MIN_PROMINENCE


def _vanishing_point(pts: np.ndarray, dirs: np.ndarray, keep: np.ndarray, scale: float) -> np.ndarray | None:
    """The homogeneous point (3,) (coordinates / `scale`) nearest to the most bands' lines that all pass within
    MAX_RESIDUAL_DEG of it, at least MIN_BANDS of those that show lines (the rest: a band of text, a stamp, the
    desk beyond the page); None if there is no such point. Four of six is too little: on flat pages whose lines are
    mostly traces (no grid, a large gain) two bands the waves bend can meet a near point (1 of 72 own flat pages)."""
    p = pts / scale
    lines = np.concatenate([dirs[:, 1:], -dirs[:, :1], (dirs[:, :1] * p[:, 1:] - dirs[:, 1:] * p[:, :1])], axis=1)
    shown = np.flatnonzero(keep)
    for n in range(shown.size, MIN_BANDS - 1, -1):
        best = None
        for subset in itertools.combinations(shown, n):
            idx = list(subset)
            vp = np.linalg.svd(lines[idx])[2][-1]
            to_vp = vp[:2] - p[idx] * vp[2]  # from each band's point towards the point (a direction at infinity)
            cross = np.abs(dirs[idx, 0] * to_vp[:, 1] - dirs[idx, 1] * to_vp[:, 0])
            miss = np.degrees(np.arcsin(np.clip(cross / np.maximum(np.linalg.norm(to_vp, axis=1), 1e-12), 0, 1)))
            if miss.max() <= MAX_RESIDUAL_DEG and (best is None or miss.max() < best[1]):
                best = (vp, float(miss.max()))
        if best is not None:
            return best[0]
    return None


def _fit(lines: np.ndarray) -> np.ndarray | None:
    """The homography (3x3, line-map px -> line-map px) that sends both vanishing points to infinity along the axes
    and keeps the map's centre in place with the picture's local area and aspect there (the grid's own aspect is
    set afterwards: `_grid_aspect`); None when a family's bands do not meet in one point."""
    h, w = lines.shape
    scale = float(max(h, w))
    ph, pv = band_slopes(lines)
    fh = _vanishing_point(*_band_lines(ph, h, w, True), scale)
    fv = _vanishing_point(*_band_lines(pv, h, w, False), scale)
    if fh is None or fv is None:
        return None
    horizon = np.cross(fh, fv)
    if abs(horizon[2]) < 1e-9:
        return None
    proj = np.array([[1.0, 0, 0], [0, 1.0, 0], horizon / horizon[2]])  # the horizon goes to infinity
    dh, dv = (proj @ fh)[:2], (proj @ fv)[:2]  # the two families' directions once parallel
    dh, dv = dh * np.sign(dh[0] or 1.0), dv * np.sign(dv[1] or 1.0)  # right and down
    basis = np.stack([dh / np.linalg.norm(dh), dv / np.linalg.norm(dv)], axis=1)
    if abs(np.linalg.det(basis)) < 0.5:  # the families are far from perpendicular: not a page's lines
        return None
    m = np.eye(3)
    m[:2, :2] = np.linalg.inv(basis)
    m = m @ proj  # the centre stays at the origin, where the Jacobian is m[:2, :2]
    jac = m[:2, :2]
    r = np.linalg.norm(jac[0]) / max(np.linalg.norm(jac[1]), 1e-12)
    k = np.sqrt(abs(np.linalg.det(jac)) * r)
    fix = np.diag([1.0 / k, r / k, 1.0])
    centre = np.array([[1.0, 0, w / 2], [0, 1.0, h / 2], [0, 0, 1.0]])
    norm = np.diag([1.0 / scale, 1.0 / scale, 1.0])
    return centre @ np.linalg.inv(norm) @ fix @ m @ norm @ np.linalg.inv(centre)


def _non_affinity(m: np.ndarray, w: int, h: int) -> float:
    """Largest distance (px) between where `m` and the affine map nearest it (least squares) send a 5x5 grid of
    points over the page (10 % in from its edges): the perspective alone. A skew or an aspect is affine; lines
    fitted a few tenths of a degree off on a flat page make one (a flat scan's trace rows), a camera's slant does
    not."""
    xs, ys = np.meshgrid(np.linspace(0.1 * w, 0.9 * w, 5), np.linspace(0.1 * h, 0.9 * h, 5))
    src = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1)
    dst = cv2.perspectiveTransform(src[None, :, :2], m)[0]
    fit = np.linalg.lstsq(src, dst, rcond=None)[0]
    return float(np.linalg.norm(src @ fit - dst, axis=1).max())


def _framed(m: np.ndarray, w: int, h: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """`m` followed by the shift that puts the whole flattened picture in view, and that view's size; None when
    the view would be more than MAX_GROWTH times the picture (a vanishing point too near the page) or the horizon
    crosses the picture."""
    src = np.float64([[0, 0], [w, 0], [w, h], [0, h]])
    if (np.c_[src, np.ones(4)] @ m[2]).min() < 0.3:
        return None
    corners = cv2.perspectiveTransform(src[None], m)[0]
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    span = hi - lo
    if not np.isfinite(span).all() or span[0] > MAX_GROWTH * w or span[1] > MAX_GROWTH * h or span.min() <= 8:
        return None
    shift = np.array([[1.0, 0, -lo[0]], [0, 1.0, -lo[1]], [0, 0, 1.0]])
    return shift @ m, (int(np.ceil(span[0])), int(np.ceil(span[1])))
