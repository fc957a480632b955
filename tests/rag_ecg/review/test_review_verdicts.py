"""Verdicts from a review page's CSV stored with their job, on real SQLite and PostgreSQL stores: idempotent
re-import, newer decisions win, a CSV for another job or naming unknown charts is refused whole."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlalchemy import func, select

from rag_ecg.data.store import ReviewItem, open_store
from rag_ecg.errors import InputError
from rag_ecg.review.inputs import Chart
from rag_ecg.review.jobs import ReviewVerdict, add_items, job_verdicts, open_job
from rag_ecg.review.verdicts import CSV_COLUMNS, import_verdicts


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def job(store_url, tmp_path):
    store = open_store(store_url)
    key = "f" * 64
    job_id, _ = open_job(store, key, "dir:/charts", tmp_path / "out", {"review": {}})
    add_items(store, job_id, [Chart("a.png", "/charts/a.png", "image"), Chart("b <x>.png", "/charts/b.png", "image")])
    other, _ = open_job(store, "e" * 64, "dir:/other", tmp_path / "other", {"review": {}})
    add_items(store, other, [Chart("c.png", "/charts/c.png", "image")])
    with store.session() as s:
        ids = {k: i for i, k in s.execute(select(ReviewItem.id, ReviewItem.chart_key))}
    yield {"store": store, "id": job_id, "key": key, "ids": ids}
    store.dispose()


def row(job, chart, verdict="agree", comment="", at="2026-11-29T10:00:00.000Z", key=None):
    return {"job_key": key or job["key"], "job_id": job["id"], "chart_id": job["ids"][chart], "chart": chart,
            "verdict": verdict, "comment": comment, "decided_at": at}


def test_import_is_idempotent_and_the_newer_decision_wins(job, tmp_path):
    store = job["store"]
    f = write_csv(tmp_path / "v.csv", [row(job, "a.png", "disagree", "'=SUM(A1) <b>rate too high</b>"),
                                        row(job, "b <x>.png", "", "comment only")])
    res = import_verdicts(store, f)
    assert (res.added, res.updated, res.unchanged) == (2, 0, 0)
    res = import_verdicts(store, f)  # the same file again: nothing changes
    assert (res.added, res.updated, res.unchanged) == (0, 0, 2)
    got = job_verdicts(store, job["id"])
    a, b = job["ids"]["a.png"], job["ids"]["b <x>.png"]
    assert got[a]["verdict"] == "disagree" and got[a]["comment"] == "=SUM(A1) <b>rate too high</b>"  # ' removed
    assert got[b] == {"verdict": "", "comment": "comment only", "decided_at": "2026-11-29T10:00:00+00:00"}
    # a newer decision replaces it; an older one (an earlier export imported late) does not
    import_verdicts(store, write_csv(tmp_path / "new.csv", [row(job, "a.png", "agree", at="2026-11-29T11:00:00Z")]))
    res = import_verdicts(store, write_csv(tmp_path / "old.csv", [row(job, "a.png", "disagree", at="2026-11-29T09:00:00Z")]))
    assert res.unchanged == 1 and job_verdicts(store, job["id"])[a]["verdict"] == "agree"
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(ReviewVerdict)) == 2  # one row per chart


@pytest.mark.parametrize("case", ["other job", "unknown id", "id of another job", "bad verdict", "not a verdict csv"])
def test_a_csv_that_does_not_fit_is_refused_whole(job, tmp_path, case):
    store = job["store"]
    good = row(job, "a.png")
    bad = {"other job": [good, {**row(job, "b <x>.png"), "job_key": "0" * 64}],
           "unknown id": [good, {**row(job, "b <x>.png"), "chart_id": 99999}],
           "id of another job": [good, {**row(job, "c.png")}],
           "bad verdict": [good, row(job, "b <x>.png", "maybe")],
           "not a verdict csv": None}[case]
    path = tmp_path / "v.csv"
    if bad is None:
        path.write_text("path,labels\na.png,NORM\n")
    else:
        write_csv(path, bad)
    with pytest.raises(InputError) as err:
        import_verdicts(store, path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert {"other job": "rows of 2 jobs", "unknown id": "not charts of review job",
            "id of another job": "c.png", "bad verdict": "'maybe'", "not a verdict csv": "missing column"}[case] in msg
    assert job_verdicts(store, job["id"]) == {}  # nothing stored


def test_a_csv_for_a_job_this_store_does_not_hold(job, tmp_path):
    path = write_csv(tmp_path / "v.csv", [{**row(job, "a.png"), "job_key": "1" * 64}])
    with pytest.raises(InputError, match=r"review job 111111111111, which .* does not hold"):
        import_verdicts(job["store"], path)


def test_a_replaced_chart_loses_the_verdict_on_its_old_file(store_url, tmp_path):
    store = open_store(store_url)
    job_id, _ = open_job(store, "d" * 64, "dir:/x", tmp_path / "out", {"review": {}})
    add_items(store, job_id, [Chart("a.png", "/x/a.png", "image", fingerprint="10:1"),
                              Chart("b.png", "/x/b.png", "image", fingerprint="20:1")])
    with store.session() as s:
        ids = {k: i for i, k in s.execute(select(ReviewItem.id, ReviewItem.chart_key))}
    import_verdicts(store, write_csv(tmp_path / "v.csv", [
        {"job_key": "d" * 64, "job_id": job_id, "chart_id": ids[k], "chart": k, "verdict": "agree", "comment": "",
         "decided_at": "2026-11-29T10:00:00Z"} for k in ("a.png", "b.png")]))
    # a.png replaced by another file at the same path (another size/mtime): reviewed again, its verdict dropped
    add_items(store, job_id, [Chart("a.png", "/x/a.png", "image", fingerprint="11:2"),
                              Chart("b.png", "/x/b.png", "image", fingerprint="20:1")])
    assert set(job_verdicts(store, job_id)) == {ids["b.png"]}
    store.dispose()
