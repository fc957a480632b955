"""A page scanned sideways (90° or 270°) or upside down is read the right way up: same layout, same traces."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
from rag_ecg.paper.digitize import _resize, canonicalize, digitize
from rag_ecg.paper.ink import ink_map
from rag_ecg.paper.orientation import lines_across, looks_sideways
from rag_ecg.paper.read_quality import agreement as _agree
from rag_ecg.paper.layout import RenderConfig
from rag_ecg.paper.render import render_page_and_layout


@pytest.mark.parametrize("preset", ["clean", "scan"])
def test_sideways_page_reads_like_the_upright_one(ptb, preset):
    image, result = render_page_and_layout(ptb, preset=preset, config=RenderConfig(dpi=100), seed=5)
    cfg = result.config
    truth, tmask = canonicalize(ptb.signal_mv(), ptb.fs, cfg.layout, cfg.rhythm_lead, result.leads[0].t_start)
    upright = digitize(np.asarray(image))
    assert upright.turns == 0 and upright.layout == cfg.layout
    base = _agree(upright.signal, upright.mask, truth, tmask)
    for degrees in (90, 270):  # PIL turns counter-clockwise; reading it back takes the other quarter turns
        read = digitize(np.asarray(image.rotate(degrees, expand=True)))
        assert read.turns == (4 - degrees // 90) % 4 and read.layout == cfg.layout, (degrees, read.turns)
        assert _agree(read.signal, read.mask, truth, tmask) > base - 0.02, degrees


# NORMAL_0057: the first one read; HMI_0011: turned 90° it was read as lying upright (the segmenter followed the
# vertical traces) and at 270° turned the wrong quarter (its upright traces skew down); ecg00006 (a GE page): pulse
# at both row ends on some rows, told apart by which end holds more standing pulses
@pytest.mark.parametrize("name", ["khan/NORMAL_0057.jpg", "khan/HMI_0011.jpg", "assorted/ecg00006.png"])
def test_real_printout_scanned_sideways(shared_data, name):
    """A real printout turned a quarter either way reads as the upright picture does."""
    image = Image.open(shared_data / "real-pictures" / name).convert("RGB")
    upright = digitize(np.asarray(image))
    assert upright.turns == 0
    for degrees in (90, 270):
        read = digitize(np.asarray(image.rotate(degrees, expand=True)))
        assert read.turns == (4 - degrees // 90) % 4 and read.layout == upright.layout, (degrees, read.turns)
        both = upright.mask & read.mask
        cors = [np.corrcoef(upright.signal[i][both[i]], read.signal[i][both[i]])[0, 1] for i in range(12)]
        assert np.mean(cors) > 0.9, (degrees, cors)


@pytest.mark.parametrize("preset", ["clean", "scan"])
def test_upside_down_page_is_turned_over(ptb, preset):
    """Upside down, a page's calibration pulses hang down at the rows' right ends: read turned 180°, it reads as
    the upright page does; the upright page is not turned (no pulse hangs down there)."""
    image, result = render_page_and_layout(ptb, preset=preset, config=RenderConfig(dpi=100), seed=5)
    cfg = result.config
    truth, tmask = canonicalize(ptb.signal_mv(), ptb.fs, cfg.layout, cfg.rhythm_lead, result.leads[0].t_start)
    upright = digitize(np.asarray(image))
    assert upright.turns == 0 and not upright.upside_down
    read = digitize(np.asarray(image.rotate(180)))
    assert read.turns == 2 and read.layout == cfg.layout
    assert _agree(read.signal, read.mask, truth, tmask) > _agree(upright.signal, upright.mask, truth, tmask) - 0.02


@pytest.mark.parametrize("name", ["khan/NORMAL_0057.jpg", "ecg-image-kit"])
def test_real_and_foreign_pages_upside_down(shared_data, name):
    """A real hospital printout and another renderer's page, turned 180°, are read the right way up."""
    path = (shared_data / "real-pictures" / name if name.startswith("khan")
            else sorted((shared_data / "ecg-image-kit" / "pages").glob("*.png"))[0])
    image = Image.open(path).convert("RGB")
    assert digitize(np.asarray(image)).turns == 0
    assert digitize(np.asarray(image.rotate(180))).turns == 2


def test_an_upright_photo_beside_a_dark_table_is_not_taken_for_sideways(ptbxl_dir):
    """A phone photo whose dark table border inks columns down the picture: the whole picture's ink then runs in
    columns (`lines_across` < 0), the page's middle in rows; it is read upright first (it was read four times)."""
    rows, _ = read_ptbxl_index(ptbxl_dir)
    record = ptbxl_record([r for r in rows if r.fold == 9][16])
    image, result = render_page_and_layout(record, preset="photo", seed=7016, dpi=100)
    ink = ink_map(_resize(np.asarray(image))[0])
    assert lines_across(ink) < 0 and not looks_sideways(ink)
    turned = ink_map(_resize(np.asarray(image.rotate(90, expand=True)))[0])
    assert looks_sideways(turned)
    assert digitize(np.asarray(image)).turns == 0
