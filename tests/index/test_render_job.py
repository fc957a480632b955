"""The render job: pages + layout JSON for many records, in parallel, deterministic, bad inputs skipped."""
from __future__ import annotations

import json

import pytest

from index.render_job import read_record, render_many
from rag_ecg.data.records import STANDARD_LEADS, RecordError


def test_render_many_writes_pages_and_layouts_in_parallel_deterministically(ptbxl_dir, ludb_dir, tmp_path,
                                                                            log_messages):
    items = [ptbxl_dir / "records100" / "00310_lr", ludb_dir / "data" / "1.hea", tmp_path / "missing"]
    skipped = log_messages("index.render_job")
    kw = dict(layout="6x2", preset="scan", seed=3, dpi=50, progress=False)
    first = render_many(items, tmp_path / "a", workers=2, **kw)
    again = render_many(items, tmp_path / "b", workers=1, **kw)
    assert [p.name for p in first] == ["00310_lr.png", "1.png"]
    assert len(skipped) == 2 and all("missing" in s and "no WFDB header" in s for s in skipped)
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes()  # same seed -> same file, whichever process drew it
    meta = json.loads(first[0].with_suffix(".json").read_text())
    assert meta["record_id"] == "ptbxl:310" and meta["layout"] == "6x2" and meta["preset"] == "scan"
    assert sorted(d["lead"] for d in meta["leads"]) == sorted(STANDARD_LEADS)
    ptb, lud = read_record(items[0]), read_record(items[1])  # dataset metadata found from the path
    assert (ptb.record_id, ptb.age, ptb.sex, ptb.labels) == ("ptbxl:310", 63.0, "M", ["MI", "CD"])
    assert (lud.record_id, lud.age, lud.sex) == ("ludb:1", 51.0, "F")
    with pytest.raises(RecordError, match="missing"):
        render_many(items, tmp_path / "c", workers=1, strict=True, **kw)
