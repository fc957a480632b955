"""The review job's rows in SQL (rag_ecg.review.jobs, and the outputs made from them), on SQLite and PostgreSQL."""
from __future__ import annotations

from rag_ecg.data.store import open_store
from rag_ecg.review.config import ReviewConfig
from rag_ecg.review.inputs import Chart
from rag_ecg.review.jobs import add_items, commit_results, open_job, pending_batches, start_attempts, status_counts
from rag_ecg.review.outputs import write_outputs
from rag_ecg.review.pipeline import ChartResult
from tests.rag_ecg.review.conftest import rows_of


def test_job_rows_on_sqlite_and_postgresql(store_url, tmp_path):
    """The durable-job SQL (create/find, bulk insert, attempts, one-transaction commit, outputs) on both
    databases the store supports."""
    store = open_store(store_url)
    cfg = ReviewConfig(batch_size=2, max_attempts=2)
    settings = {"review": {"backend": "retrieval", "k": 8, "preset": "clean", "dpi": 100}, "index": {}}
    job, existed = open_job(store, "a" * 64, "dir:/charts", tmp_path, settings)
    assert not existed and open_job(store, "a" * 64, "dir:/charts", tmp_path, settings) == (job, True)
    charts = [Chart(f"c{i}.png", f"/charts/c{i}.png", "image") for i in range(5)]
    assert add_items(store, job, charts) == 5 and add_items(store, job, charts) == 0
    batches = list(pending_batches(store, job, 2))
    assert [len(b) for b in batches] == [2, 2, 1] and [b[1] for b in batches[0]] == ["c0.png", "c1.png"]
    assert start_attempts(store, batches[0], 2) == []
    report = {"diagnoses": [{"label": "normal ECG", "confidence": 0.8, "code": None, "superclass": "NORM",
                             "cited": [3]}], "impression": {"text": "Like case 3.", "cited": [3]}}
    commit_results(store, tmp_path, [
        ChartResult(batches[0][0][0], "done", None, {"load": 0.1, "embed": 0.01, "search": 0.01, "report": 0.001},
                    report, [{"case_id": 3, "score": 0.9, "labels": ["NORM"]}]),
        ChartResult(batches[0][1][0], "error", "c1.png: empty file", {"load": 0.01})])
    assert status_counts(store, job) == {"pending": 3, "done": 1, "unparsed": 0, "error": 1}
    # c2 and c3 were being processed by a run that died twice: given up at the next start
    assert start_attempts(store, batches[1], 2) == [] and start_attempts(store, batches[1], 2) == []
    gave_up = start_attempts(store, batches[1], 2)
    assert [r.status for r in gave_up] == ["error", "error"] and "gave up after 2 attempts" in gave_up[0].error
    commit_results(store, tmp_path, gave_up)
    out = write_outputs(store, job, tmp_path, cfg)
    rows = rows_of(tmp_path)
    assert rows["c0.png"]["top_diagnosis"] == "NORM" and rows["c0.png"]["cited_cases"] == [3]
    assert rows["c1.png"]["error"] == "c1.png: empty file" and rows["c4.png"]["status"] == "pending"
    assert out["csv"].read_text().count("\n") == 6
    store.dispose()
