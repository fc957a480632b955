"""The ingest job on a real SQLite file and a real PostgreSQL database: idempotent, labels as PTB-XL says,
bad records skipped with a reason and the rest kept."""
from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select

from index.ingest import ingest
from rag_ecg.data.records import read_ptbxl_index
from rag_ecg.data.store import Case, IngestRun, IngestSkip, open_store, scp_descriptions, summary


def test_ingest_is_idempotent_and_labels_match(store_url, ptbxl_dir, ludb_dir):
    store = open_store(store_url)
    first = ingest(store, "ptbxl", ptbxl_dir, limit=40, batch_size=16, progress=False)
    assert (first.inserted, first.updated, first.skipped) == (40, 0, [])
    ingest(store, "ludb", ludb_dir, limit=3, progress=False)
    before = summary(store)
    with store.session() as s:
        stamps = dict(s.execute(select(Case.id, Case.updated_at)).all())
    again = ingest(store, "ptbxl", ptbxl_dir, limit=40, progress=False)
    assert (again.inserted, again.updated, again.skipped) == (0, 0, [])  # a re-run changes nothing
    assert summary(store) == before
    with store.session() as s:
        assert dict(s.execute(select(Case.id, Case.updated_at)).all()) == stamps  # not even written
        assert s.scalar(select(IngestRun).order_by(IngestRun.id.desc())).updated == 0
    assert ingest(store, "ludb", ludb_dir, limit=3, progress=False).updated == 0  # JSON `extra` too
    same_folder = ptbxl_dir / ".." / ptbxl_dir.name  # another spelling of the same files: still unchanged
    assert ingest(store, "ptbxl", same_folder, limit=40, progress=False).updated == 0
    assert before["by_source"] == {"ptbxl": 40, "ludb": 3}

    rows, _ = read_ptbxl_index(ptbxl_dir)
    expected: dict[str, int] = {}
    for r in rows[:40]:
        for lab in r.labels:
            expected[lab] = expected.get(lab, 0) + 1
    assert before["by_label"]["ptbxl"] == expected
    with store.session() as s:
        case = s.scalar(select(Case).where(Case.source == "ptbxl", Case.external_id == "103"))
        assert case.labels == ["MI", "CD"] and case.codes["IMI"] == 15.0
        assert case.fold == rows[next(i for i, r in enumerate(rows) if r.ecg_id == "103")].fold
        assert case.split in {"train", "val"} and case.units == "NU" and case.n_samples == 1000
        assert scp_descriptions(s)["LAFB"] == "left anterior fascicular block"
    store.dispose()


def test_reingest_updates_changed_metadata(store_url, ptbxl_dir, tmp_path):
    # A copy of the dataset whose report for one ECG changes between runs: the row is updated in place.
    root = tmp_path / "ptbxl"
    root.mkdir()
    shutil.copy(ptbxl_dir / "scp_statements.csv", root)
    lines = (ptbxl_dir / "ptbxl_database.csv").read_text().splitlines()[:6]
    (root / "records100").symlink_to(ptbxl_dir / "records100")
    (root / "ptbxl_database.csv").write_text("\n".join(lines) + "\n")
    store = open_store(store_url)
    ingest(store, "ptbxl", root, progress=False)
    (root / "ptbxl_database.csv").write_text("\n".join(lines).replace("sinusrhythmus normales ekg",
                                                                        "EDITED REPORT", 1) + "\n")
    res = ingest(store, "ptbxl", root, progress=False)
    assert (res.inserted, res.updated) == (0, 1)  # only the edited report counts
    with store.session() as s:
        reports = [c.report for c in s.scalars(select(Case).order_by(Case.id))]
        assert len(reports) == 5 and reports[0] == "EDITED REPORT"
        assert len(s.scalars(select(IngestRun)).all()) == 2
    store.dispose()


def test_bad_records_are_skipped_with_reasons_and_the_rest_kept(store_url, ptbxl_dir, tmp_path, log_messages):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, name in enumerate(["00024_lr", "00043_lr", "00055_lr", "00085_lr"]):
        for ext in (".hea", ".dat"):
            shutil.copy(ptbxl_dir / "records100" / f"{name}{ext}", folder / f"{name}{ext}")
    dat = folder / "00043_lr.dat"
    dat.write_bytes(dat.read_bytes()[:500])  # truncated
    (folder / "00055_lr.dat").unlink()  # missing signal
    store = open_store(store_url)
    lines = log_messages("index.ingest")
    res = ingest(store, "wfdb", folder, batch_size=2, progress=False)
    assert res.inserted == 2 and len(res.skipped) == 2
    assert any(s.startswith("00043_lr: ") and "truncated" in s for s in res.skipped)
    assert any(s.startswith("00055_lr: signal file missing") for s in res.skipped)
    assert lines == [f"skipped {s}" for s in res.skipped]
    with store.session() as s:
        assert {c.external_id for c in s.scalars(select(Case))} == {"00024_lr", "00085_lr"}
        assert len(s.scalars(select(IngestSkip)).all()) == 2
    store.dispose()


def test_unknown_source_and_path(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="unknown source 'mimic'"):
        ingest(store, "mimic", tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        ingest(store, "ptbxl", tmp_path / "nope", progress=False)
