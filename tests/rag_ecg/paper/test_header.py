"""The printed header: known values only (never invented intervals), the rate measured against LUDB's QRS marks."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import wfdb

from rag_ecg.data.records import read_ludb
from rag_ecg.paper.header import estimate_heart_rate, header_lines
from rag_ecg.paper.layout import RenderConfig


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_heart_rate_matches_ludb_qrs_annotations(ludb_dir, n):
    rec = read_ludb(ludb_dir / "data" / str(n))
    ann = wfdb.rdann(str(ludb_dir / "data" / str(n)), "ii")
    qrs = np.asarray([s for s, sym in zip(ann.sample, ann.symbol) if sym.upper() == "N"])
    reference = 60.0 * rec.fs / np.median(np.diff(qrs))
    est = estimate_heart_rate(rec.lead("II") * rec.mv_per_unit, rec.fs)
    assert est == pytest.approx(reference, rel=0.05)


def test_header_prints_known_values_and_never_invents_intervals(ptb, ludb):
    lines = header_lines(ptb, RenderConfig(), heart_rate=61.4)
    text = "\n".join(lines)
    assert "ptbxl:310" in text and "63 yr" in text and "Male" in text and "61 bpm" in text
    assert "PR: --- ms" in text and "QRS: --- ms" in text and "QT/QTc: ---/--- ms" in text
    assert "25 mm/s" in text and "10 mm/mV" in text
    known = replace(ludb, extra={**ludb.extra, "intervals": {"pr_ms": 160, "qrs_ms": 92}})
    text = "\n".join(header_lines(known, RenderConfig(gain_mm_mv=5), heart_rate=None))
    assert "PR: 160 ms" in text and "QRS: 92 ms" in text and "QT/QTc: ---/--- ms" in text
    assert "Vent. rate: --- bpm" in text and "5 mm/mV" in text and "Female" in text
