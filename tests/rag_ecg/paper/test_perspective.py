"""Perspective correction (paper/perspective.py): a page photographed at a slant is flattened before it is read, and
then reads with the right layout and nearly as well as the flat page (as it lies it is refused, or read far worse);
a flat page (a rendering, a scan) is read exactly as before; the read's points go back through the homography onto
the photographed traces, and the JSON says what was applied."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.paper.calibration import calibrate, to_millivolts
from rag_ecg.paper.digitize import FS, N_SAMPLES, DigitizeError, _resize, digitize, working_page
from rag_ecg.paper.export import perspective_json, trace_points
from rag_ecg.paper.layout import RenderConfig
from rag_ecg.paper.perspective import estimate
from rag_ecg.paper.read_quality import snr_db
from rag_ecg.paper.render import render_page_and_layout

DESK = (70, 60, 50)
# where a slanted camera sees the page's corners (top-left, top-right, bottom-right, bottom-left), as a share of the
# picture: the far edge 23 % shorter than the near one, the left edge 22 % shorter than the right
SLANT = np.float32([[0.13, 0.10], [0.90, 0.03], [0.97, 0.97], [0.04, 0.88]])


@pytest.fixture(scope="module")
def pages(ptb):
    """A clean 3x4+II page, the same page photographed at SLANT on a desk, its truth in mV, the slant's homography."""
    image, result = render_page_and_layout(ptb, config=RenderConfig(dpi=100), seed=5)
    page = np.asarray(image)
    h, w = page.shape[:2]
    slant = cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), SLANT * np.float32([w, h]))
    photo = cv2.warpPerspective(page, slant, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=DESK)
    sig = ptb.signal_mv()
    t = result.leads[0].t_start + np.arange(N_SAMPLES) / FS
    truth = np.full((12, N_SAMPLES), np.nan)
    for box in result.leads:  # each lead where the page prints it
        i, inside = STANDARD_LEADS.index(box.lead), (t >= box.t_start) & (t < box.t_end)
        truth[i, inside] = np.interp(t[inside], np.arange(sig.shape[0]) / ptb.fs, sig[:, i])
    return {"page": page, "photo": photo, "slant": slant, "truth": truth, "result": result}


def _snr(picture: np.ndarray, truth: np.ndarray, **kw) -> tuple[object, float | None]:
    """(read, Challenge SNR in dB of its millivolts against the truth), (None, None) when the picture is refused."""
    try:
        read = digitize(picture, method="classical", **kw)
    except DigitizeError:
        return None, None
    mv = to_millivolts(read, calibrate(working_page(picture, read), read), FS).T
    return read, snr_db(mv, truth, FS)[0]


def test_a_slanted_photo_is_flattened_and_read_nearly_as_well_as_the_flat_page(pages):
    read, flat_db = _snr(pages["photo"], pages["truth"])
    as_lies, lies_db = _snr(pages["photo"], pages["truth"], flatten=False)
    _, page_db = _snr(pages["page"], pages["truth"])
    assert read.homography is not None and read.layout == "3x4+II"
    assert flat_db > page_db - 2.0, (flat_db, page_db)  # measured 12.0 dB; the flat page 11.8
    assert as_lies is None or lies_db < flat_db - 4.0, (lies_db, flat_db)  # as it lies: refused (2 rows found)


def test_the_flattened_page_is_the_page_square_on(pages):
    """Page px -> photo -> working frame is an axis-aligned scaling and shift: the slant is gone (the mapped grid of
    points stays within a pixel of it) and the grid's squares are square."""
    read = digitize(pages["photo"], method="classical")
    h, w = pages["page"].shape[:2]
    chain = read.homography @ np.diag([read.work_scale, read.work_scale, 1.0]) @ pages["slant"]
    xs, ys = np.meshgrid(np.linspace(0.1 * w, 0.9 * w, 9), np.linspace(0.15 * h, 0.9 * h, 7))
    src = np.stack([xs.ravel(), ys.ravel()], axis=1)
    dst = cv2.perspectiveTransform(src[None], chain)[0]
    scale = []
    for axis in (0, 1):
        fit = np.polyfit(src[:, axis], dst[:, axis], 1)
        assert np.abs(np.polyval(fit, src[:, axis]) - dst[:, axis]).max() < 1.5, axis
        scale.append(fit[0])
    assert abs(scale[1] / scale[0] - 1.0) < 0.01, scale
    assert abs(read.angle) < 0.3  # nothing left for the deskew
    # px/mm in the photo's own pixels, where the working page's middle lies on it: the grid's, over the zoom there
    cal = calibrate(working_page(pages["photo"], read), read)
    mid = cv2.perspectiveTransform(np.float64([[[read.work_size[0] / 2, read.work_size[1] / 2]]]),
                                   np.linalg.inv(chain))[0, 0]  # on the clean page
    g = pages["slant"]
    u, v, z = g @ np.array([*mid, 1.0])
    zoom = np.sqrt(abs(np.linalg.det((g[:2, :2] * z - np.outer([u, v], g[2, :2])) / z ** 2)))
    assert abs(cal.px_per_mm / read.picture_scale / (pages["result"].px_per_mm * zoom) - 1) < 0.03


@pytest.mark.parametrize("preset", ["clean", "scan"])
def test_a_flat_page_is_read_exactly_as_it_lies(ptb, preset):
    """A rendering and a scan (rotated, no slant) show no perspective: the same pixels are read, the same read."""
    image, _ = render_page_and_layout(ptb, preset=preset, config=RenderConfig(dpi=100), seed=2)
    page = np.asarray(image)
    assert estimate(_resize(page)[0]) is None
    read, as_lies = digitize(page, method="classical"), digitize(page, method="classical", flatten=False)
    assert read.homography is None and read.resized_size == read.work_size
    assert np.array_equal(read.signal, as_lies.signal) and read.rows == as_lies.rows and read.boxes == as_lies.boxes
    assert np.array_equal(working_page(page, read), working_page(page, as_lies))
    assert perspective_json(read) is None


def test_picture_points_go_back_through_the_homography_onto_the_photographed_traces(pages):
    photo = pages["photo"]
    read = digitize(photo, method="classical")
    pts = np.concatenate([p for _, _, p in trace_points(read)])
    pts = pts[np.isfinite(pts).all(axis=1)]
    back = read.picture_points(pts)
    # forward again: resize, flatten, deskew = the working frame's points
    w, h = read.work_size
    fwd = cv2.perspectiveTransform((back * read.work_scale)[None], read.homography)[0]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), read.angle, 1.0)
    fwd = fwd @ rot[:, :2].T + rot[:, 2] if abs(read.angle) > 0.05 else fwd
    assert np.abs(fwd - pts).max() < 1e-6
    # and they land on the photo's pen ink (what the overlay draws)
    dark = cv2.dilate((photo.max(axis=2) < 100).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    xi, yi = np.rint(back[:, 0]).astype(int), np.rint(back[:, 1]).astype(int)
    inside = (xi >= 0) & (xi < photo.shape[1]) & (yi >= 0) & (yi < photo.shape[0])
    assert inside.all() and dark[yi, xi].mean() > 0.9
    # the JSON: the homography in the picture's px and the quadrilateral read as the flat page
    info = perspective_json(read)
    corners = np.array(info["corners_picture"])
    assert cv2.pointPolygonTest(np.float32(SLANT * np.float32(photo.shape[1::-1])), tuple(map(float, corners.mean(0))),
                                False) > 0
    to_work = cv2.perspectiveTransform(corners[None], np.array(info["matrix"]))[0]
    if abs(read.angle) <= 0.05:
        assert np.abs(to_work - [[0, 0], [w, 0], [w, h], [0, h]]).max() < 0.5
