"""Batch review robustness (issue 15 point 5): a loader worker killed mid-run, backend outages, replaced
files, and two runs of one job at once. Real SIGKILLs, a real HTTP server, real SQLite files."""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rag_ecg.data.store import ReviewItem, ReviewJob, open_store
from rag_ecg.errors import BackendError
from rag_ecg.review.config import ReviewConfig, ReviewError
from rag_ecg.review.run import review
from tests.openai_server import OpenAITestServer
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer
from tests.rag_ecg.review.conftest import BATCH, GOOD, comparable, fresh_store, rows_of

ROOT = Path(__file__).resolve().parents[3]


def test_a_killed_loader_worker_costs_only_its_chart(review_env, uninterrupted, tmp_path, monkeypatch):
    """The loader process that opens `bad/broken.pdf` is SIGKILLed (the test hook in rag_ecg.review.loader),
    also on its retry: that chart alone is an error row, every other chart ends as in a clean run."""
    monkeypatch.setenv("RAG_ECG_TEST_KILL_LOADER_ON", "bad/broken.pdf")
    url = fresh_store(review_env, tmp_path)
    s = review(review_env["charts"], tmp_path / "out", store=url, index_dir=review_env["index"], workers=2,
               batch_size=BATCH, progress=False)
    assert (s.total, s.pending) == (14, 0)
    rows, clean = rows_of(tmp_path / "out"), rows_of(uninterrupted["out"])
    assert rows.pop("bad/broken.pdf")["error"] == "bad/broken.pdf: crashed the chart loader process"
    clean.pop("bad/broken.pdf")
    assert {k: comparable(v) for k, v in rows.items()} == {k: comparable(v) for k, v in clean.items()}


def _good_folder(review_env, folder: Path, n: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, _, _ in GOOD[:n]:
        shutil.copy(Path(review_env["charts"]) / rel, folder / Path(rel).name)
    return sorted(Path(rel).name for rel, _, _ in GOOD[:n])


def test_backend_outages_do_not_use_up_attempts(review_env, tmp_path):
    """Four runs while the LLM server fails (unreachable, then HTTP 500 three times: more than max_attempts)
    leave every chart pending with no attempt counted; once the server answers, every chart is done."""
    pytest.importorskip("openai")
    _good_folder(review_env, tmp_path / "charts")
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    base = dict(model="tiny-llava", timeout_s=5.0, max_retries=0, backoff_s=0.01, max_tokens=64)
    with OpenAITestServer() as srv:
        down_url = srv.url  # nothing listens here once the server has stopped
    runs = [down_url, None, None, None]
    with OpenAITestServer(replies=[answer(GOOD_JSON)] * 4) as srv:
        for where in runs:
            srv.always_status = 500
            opts = {**base, "base_url": where or srv.url}
            cfg = ReviewConfig(backend="vllm", backend_options=opts, workers=1, batch_size=BATCH, max_attempts=3)
            with pytest.raises(BackendError):
                review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], config=cfg,
                       progress=False)
        store = open_store(url)
        with store.session() as s:
            items = list(s.query(ReviewItem))
        assert len(items) == 4 and all(i.status == "pending" and i.attempts == 0 for i in items)
        srv.always_status = None
        cfg = ReviewConfig(backend="vllm", backend_options={**base, "base_url": srv.url}, workers=1,
                           batch_size=BATCH, max_attempts=3)
        s = review(tmp_path / "charts", out, store=store, index_dir=review_env["index"], config=cfg, progress=False)
    assert (s.done, s.error, s.pending, s.processed) == (4, 0, 0, 4)
    store.dispose()


def test_a_replaced_file_is_reviewed_again_and_an_unchanged_folder_resumes(review_env, tmp_path):
    """Charts are known by path *and* content (size + mtime_ns): a picture replaced at the same path is
    redone on the next run (its row replaced), an unchanged folder has nothing to do, the job stays one."""
    names = _good_folder(review_env, tmp_path / "charts")
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    kw = dict(store=url, index_dir=review_env["index"], workers=1, batch_size=BATCH, progress=False)
    first = review(tmp_path / "charts", out, **kw)
    assert (first.done, first.processed) == (4, 4)
    again = review(tmp_path / "charts", out, **kw)
    assert (again.processed, again.resumed, again.key) == (0, True, first.key)
    before = rows_of(out)
    # page.png is replaced by a picture that is no ECG: its new result must say so
    shutil.copy(Path(review_env["charts"]) / "bad/gradient.png", tmp_path / "charts" / "page.png")
    third = review(tmp_path / "charts", out, **kw)
    assert (third.processed, third.total, third.done, third.error) == (1, 4, 3, 1)
    assert (third.key, third.job_id) == (first.key, first.job_id)
    after = rows_of(out)
    assert sorted(after) == names and before["page.png"]["status"] == "done"
    assert after["page.png"]["status"] == "error" and "no readable ECG traces" in after["page.png"]["error"]
    assert {k: comparable(v) for k, v in after.items() if k != "page.png"} == \
        {k: comparable(v) for k, v in before.items() if k != "page.png"}
    assert review(tmp_path / "charts", out, **kw).processed == 0


def test_a_store_made_by_the_old_schema_gets_the_new_columns(tmp_path):
    """A database created before the lease / fingerprint columns existed is migrated on open (ADD COLUMN);
    its job and items are kept and usable."""
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE review_jobs (id INTEGER PRIMARY KEY, key VARCHAR(64) UNIQUE, input TEXT, out_dir TEXT,
            settings JSON, status VARCHAR(16), created_at DATETIME, finished_at DATETIME);
        CREATE TABLE review_items (id INTEGER PRIMARY KEY, job_id INTEGER REFERENCES review_jobs(id),
            chart_key TEXT, path TEXT, status VARCHAR(16), error TEXT, timings JSON, report JSON, neighbours JSON,
            attempts INTEGER, finished_at DATETIME, CONSTRAINT uq_review_item_chart UNIQUE (job_id, chart_key));
        INSERT INTO review_jobs VALUES (1, 'k', 'dir:/x', '/out', '{}', 'done', '2024-01-01 00:00:00', NULL);
        INSERT INTO review_items VALUES (1, 1, 'a.png', '/x/a.png', 'done', NULL, '{}', NULL, NULL, 1, NULL);
    """)
    con.commit()
    con.close()
    store = open_store(f"sqlite:///{db}")
    with store.session() as s:
        item = s.get(ReviewItem, 1)
        assert (item.chart_key, item.status, item.fingerprint) == ("a.png", "done", None)
        job = s.get(ReviewJob, 1)
        assert (job.key, job.locked_by, job.lease_until) == ("k", None, None)
        item.fingerprint = "1:2"
    store.dispose()
    store = open_store(f"sqlite:///{db}")  # a second open finds nothing to add
    with store.session() as s:
        assert s.get(ReviewItem, 1).fingerprint == "1:2"
    store.dispose()


def test_a_second_run_of_a_job_is_refused_while_the_first_runs_and_a_dead_runs_lease_does_not_block(
        review_env, tmp_path):
    """Two real processes on one SQLite file: while run A holds the job (paused after its first batch), run B
    is refused with one line naming A; after A is SIGKILLed, its lease is stale and B finishes the job."""
    _good_folder(review_env, tmp_path / "charts")
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from rag_ecg.review.run import review\n"
        "def on_batch(b):\n"
        "    print('committed', b.committed, flush=True)\n"
        "    sys.stdin.readline()\n"  # paused here, holding the job, until the test says so (never)
        f"review({str(tmp_path / 'charts')!r}, {str(out)!r}, store={url!r}, index_dir={review_env['index']!r},"
        " workers=1, batch_size=2, progress=False, on_batch=on_batch)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("committed 2")
        kw = dict(store=url, index_dir=review_env["index"], workers=1, batch_size=2, progress=False)
        with pytest.raises(ReviewError, match=rf"^job \d+ is being processed by another run \(pid {proc.pid} on "
                                              rf"host {socket.gethostname()}\) since \d{{4}}-"):
            review(tmp_path / "charts", out, **kw)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stdin.close()
    s = review(tmp_path / "charts", out, **kw)  # A is dead: its lease does not block
    assert (s.resumed, s.processed, s.done, s.pending) == (True, 2, 4, 0)
    store = open_store(url)
    with store.session() as ses:
        assert ses.get(ReviewJob, s.job_id).locked_by is None  # released at the end of the run
    store.dispose()
