"""A page scanned sideways (90° or 270°) is read the right way up: same layout, same traces as upright."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rag_ecg.paper.digitize import canonicalize, digitize
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


def test_real_printout_scanned_sideways(shared_data):
    """A real hospital printout (Khan et al.) turned a quarter reads as the upright picture does."""
    image = Image.open(shared_data / "real-pictures" / "khan" / "NORMAL_0057.jpg").convert("RGB")
    upright = digitize(np.asarray(image))
    read = digitize(np.asarray(image.rotate(90, expand=True)))
    assert read.turns == 3 and read.layout == upright.layout == "3x4+II"
    both = upright.mask & read.mask
    cors = [np.corrcoef(upright.signal[i][both[i]], read.signal[i][both[i]])[0, 1] for i in range(12)]
    assert np.mean(cors) > 0.95, cors
