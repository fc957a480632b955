"""End-to-end evaluation: labelled sets from real folders, hand-checked scoring, a real run on a real index."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image
from sqlalchemy import select

from rag_ecg.eval.pipeline import (EvalConfig, EvalError, LabelledChart, load_labelled, parse_folds, run_eval,
                                   score_reports)

CODE_SUP = {"NORM": "NORM", "IMI": "MI", "CLBBB": "CD", "NDT": "STTC", "SR": None}


def _report(diagnoses, scores, retrieved, rhythm=None):
    return {"diagnoses": diagnoses, "rhythm": rhythm, "findings": [], "impression": None,
            "retrieval": {"superclass_scores": scores, "cases": [{"case_id": i} for i in retrieved]}}


def test_score_reports_matches_hand_computed_metrics():
    truth = [LabelledChart("a.hea", "a", ["NORM"], {"NORM": 100}),
             LabelledChart("b.hea", "b", ["MI", "STTC"], {"IMI": 100, "NDT": 50}),
             LabelledChart("c.hea", "c", ["CD"], {"CLBBB": 100, "SR": 0})]
    reports = [
        _report([{"superclass": "NORM", "confidence": 0.9, "cited": [1]}],
                {"NORM": .9, "MI": .1, "STTC": .1, "CD": 0, "HYP": 0}, [1, 2]),
        _report([{"code": "IMI", "confidence": 0.7, "cited": [2, 5]}],  # case 5 was never retrieved
                {"NORM": .1, "MI": .6, "STTC": .3, "CD": 0, "HYP": 0}, [2, 3]),
        _report([], {"NORM": .1, "MI": .2, "STTC": .5, "CD": .4, "HYP": 0}, [4],
                rhythm={"text": "sinus rhythm (SR), as in the similar cases", "cited": []}),
    ]
    m = score_reports(reports, truth, CODE_SUP)
    assert m["charts"] == 3
    assert m["macro_auc_scores"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # HYP has no positive: left out
    assert m["macro_auc_binary"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert m["macro_f1"] == pytest.approx(2 / 4)  # NORM, MI right; STTC, CD missed; HYP in no chart: not scored
    assert m["hamming_loss"] == pytest.approx(2 / 15)
    assert m["superclass_report_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["scp_report_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # SR read from the rhythm line
    assert m["citations"] == 3 and m["citations_valid"] == pytest.approx(2 / 3)


def test_parse_folds():
    assert parse_folds(None) == [9] and parse_folds("test") == [10] and parse_folds("all") is None
    assert parse_folds("fold=9") == [9] and parse_folds("8, 9") == [8, 9]
    for bad in ("eleven", "0", "11"):
        with pytest.raises(EvalError, match="split"):
            parse_folds(bad)


def test_load_labelled_real_folders(ptbxl_dir, ludb_dir):
    fold9 = load_labelled(ptbxl_dir, "val")
    with open(ptbxl_dir / "ptbxl_database.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(float(r["strat_fold"])) == 9]
    assert len(fold9.charts) == len(rows) and fold9.kind == "ptbxl" and fold9.has_codes
    want = {f"ptbxl:{int(float(r['ecg_id']))}": sorted(r["superclass"].split()) for r in rows}
    assert {c.record_id: sorted(c.labels) for c in fold9.charts} == want
    assert all(c.path.endswith(".hea") for c in fold9.charts)

    ludb = load_labelled(ludb_dir)
    assert ludb.kind == "ludb" and len(ludb.charts) == 100 and not ludb.has_codes
    assert {lab for c in ludb.charts for lab in c.labels} <= {"NORM", "MI", "STTC", "CD", "HYP"}
    assert sum("NORM" in c.labels for c in ludb.charts) < 100  # the mapping finds abnormal ECGs too


def test_labelled_images_csv_skips_bad_rows(tmp_path):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,labels\na.png,MI STTC\nmissing.png,NORM\na.png,XYZ\n")
    got = load_labelled(tmp_path)
    assert got.kind == "images" and [c.labels for c in got.charts] == [["MI", "STTC"]]
    assert len(got.skipped) == 2 and "missing.png not found" in got.skipped[0] and "XYZ" in got.skipped[1]
    (tmp_path / "labels.csv").write_text("file,diagnosis\na.png,MI\n")
    with pytest.raises(EvalError, match="'path' and 'labels'"):
        load_labelled(tmp_path / "labels.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="not a PTB-XL folder"):
        load_labelled(tmp_path / "empty")


def test_run_eval_end_to_end_and_resumes(tmp_path, ptbxl_dir, tiny_index, scratch_store):
    labelled = load_labelled(ptbxl_dir, "val", limit=4)
    cfg = EvalConfig(presets=["clean", "photo"], workers=1)
    res = run_eval(labelled, tmp_path / "ev", scratch_store, tiny_index["index"], cfg, progress=False)
    assert list(res["presets"]) == ["clean", "photo"]
    for m in res["presets"].values():
        assert m["charts"] == 4 and m["errors"] == 0 and m["citations_valid"] == 1.0
        assert 0.0 <= m["hamming_loss"] <= 1.0 and 0.0 <= m["scp_report_f1"] <= 1.0
        assert (tmp_path / "ev" / "photo" / "index.html").is_file()
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["presets"]["photo"]["macro_f1"] == res["presets"]["photo"]["macro_f1"]
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "| clean | 4 |" in md and "| photo | 4 |" in md
    again = run_eval(labelled, tmp_path / "ev", scratch_store, tiny_index["index"], cfg,
                     progress=False)  # the jobs are done: nothing is reviewed twice, same figures
    assert again["presets"] == res["presets"] | {p: {**res["presets"][p], "charts_per_s": 0.0}
                                                  for p in res["presets"]}


def test_eval_counts_citations_before_the_drop_unparsed_answers_and_keeps_secrets_out(
        tmp_path, ptbxl_dir, tiny_index, scratch_store):
    """A real OpenAI-compatible server answers chart 1 with free text (twice: the answer and its retry) and
    chart 2 with JSON citing every case of the store plus one that does not exist: citation validity is
    what was cited before the check dropped anything, not 1.0 by construction."""
    pytest.importorskip("openai")
    from rag_ecg.data.store import Case
    from tests.openai_server import OpenAITestServer
    from tests.rag_ecg.reader.test_report import GOOD_JSON, answer

    with scratch_store.session() as s:
        all_ids = sorted(s.scalars(select(Case.id)))
    reply = json.loads(json.dumps(GOOD_JSON))
    for part in [reply["rhythm"]] + reply["findings"] + reply["diagnoses"] + [reply["impression"]]:
        part["cited"] = []
    reply["findings"][0]["text"] = "Left axis deviation"
    reply["diagnoses"][0]["cited"] = all_ids
    reply["impression"]["cited"] = [987654]
    labelled = load_labelled(ptbxl_dir, "val", limit=2)
    with OpenAITestServer(replies=["no JSON here", "still no JSON", answer(reply)]) as srv:
        base_url = srv.url.replace("http://", "http://bob:p4ss-w0rd-xyz@")
        cfg = EvalConfig(presets=["clean"], workers=1, backend="vllm",
                         backend_options={"base_url": base_url, "api_key": "sk-secret-4711", "max_retries": 0})
        res = run_eval(labelled, tmp_path / "ev", scratch_store, tiny_index["index"], cfg, progress=False)
    m = res["presets"]["clean"]
    rows = [json.loads(line) for line in (tmp_path / "ev" / "clean" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["done", "unparsed"]
    done = next(r for r in rows if r["status"] == "done")
    retrieved = {n["case_id"] for n in done["neighbours"]}
    assert len(retrieved) == 8 and retrieved <= set(all_ids)
    assert m["unparsed"] == 1 and m["charts"] == 2 and m["errors"] == 0
    assert m["citations"] == len(all_ids) + 1 and m["citations_unknown"] == len(all_ids) + 1 - 8
    assert m["statements_dropped"] == 2  # the diagnosis and the impression
    assert m["citations_valid"] == pytest.approx(8 / (len(all_ids) + 1)) and m["citations_valid"] < 1.0
    for p in (tmp_path / "ev").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"sk-secret-4711" not in data and b"p4ss-w0rd-xyz" not in data, p
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["config"]["backend_options"] == {"base_url": base_url.replace("p4ss-w0rd-xyz", "***"),
                                                  "api_key": "***", "max_retries": 0}


def test_citation_validity_counts_the_statements_the_check_dropped():
    truth = [LabelledChart("a.hea", "a", ["NORM"])]
    rep = _report([{"superclass": "NORM", "confidence": 0.9, "cited": [1, 2]}], {"NORM": .9}, [1, 2, 3])
    rep["dropped_citations"] = [{"where": "impression", "text": "as in [case 9]", "cited": [3, 9], "unknown": [9]},
                                {"where": "findings[0]", "text": "x", "cited": [7, 8], "unknown": [7, 8]}]
    m = score_reports([rep], truth, CODE_SUP)
    assert (m["citations"], m["citations_unknown"], m["statements_dropped"]) == (6, 3, 2)
    assert m["citations_valid"] == pytest.approx(3 / 6)
