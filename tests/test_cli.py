"""The CLI end to end on a real tiny index: search by image, WFDB record and text; a grounded report."""
from __future__ import annotations

import json

from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from rag_ecg.render import render_page
from rag_ecg.store import Case, load_case_record

runner = CliRunner()


def _val_case(store) -> Case:
    with store.session() as s:
        return next(c for c in s.scalars(select(Case).order_by(Case.id)) if c.split == "val")


def test_search_by_image_record_and_text(tiny_index, ingested_store, tmp_path):
    case = _val_case(ingested_store)
    png = tmp_path / "query.png"
    render_page(load_case_record(case), preset="photo", seed=3).save(png)
    common = ["--index", str(tiny_index["index"]), "--db", tiny_index["db"], "--k", "4"]
    out = {}
    for name, args in {"image": [str(png)], "record": [case.signal_path + ".hea"],
                       "text": ["--text", "sinusrhythmus normales ekg"]}.items():
        res = runner.invoke(app, ["search", *args, *common, "--format", "json"])
        assert res.exit_code == 0, res.output
        out[name] = json.loads(res.output)
        assert len(out[name]["neighbours"]) == 4
        assert all(n["source"] == "ptbxl" and n["report"] for n in out[name]["neighbours"])
    assert set(out["image"]["superclass_scores"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    table = runner.invoke(app, ["search", str(png), *common])
    assert table.exit_code == 0 and "nearest cases" in table.output and "votes:" in table.output


def test_report_cites_only_retrieved_cases(tiny_index, ingested_store, tmp_path):
    case = _val_case(ingested_store)
    png = tmp_path / "q.png"
    render_page(load_case_record(case), preset="clean", seed=1, dpi=100).save(png)
    res = runner.invoke(app, ["report", str(png), "--index", str(tiny_index["index"]), "--db", tiny_index["db"],
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    from rag_ecg.report import Report

    report = Report.from_dict(rep)
    retrieved = set(report.retrieval.case_ids)
    assert len(retrieved) == 8 and report.cited_case_ids  # the retrieval reader always cites its evidence
    assert set(report.cited_case_ids) <= retrieved
    assert rep["backend"] == "retrieval" and "clinical" in rep["notice"].lower()


def test_bad_query_is_one_clear_line(tiny_index, tmp_path):
    bad = tmp_path / "ecg-07.jpg"
    bad.write_text("not an image")
    res = runner.invoke(app, ["search", str(bad), "--index", str(tiny_index["index"]), "--db", tiny_index["db"]])
    assert res.exit_code == 2 and "ecg-07.jpg" in res.output
