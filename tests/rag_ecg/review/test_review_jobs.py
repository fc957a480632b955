"""The review job's rows in SQL (rag_ecg.review.jobs, and the outputs made from them), and the job lease
between real concurrent processes, on SQLite and PostgreSQL."""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update

from rag_ecg.data.store import ReviewItem, ReviewJob, open_store
from rag_ecg.review.config import ReviewConfig, ReviewError
from rag_ecg.review.inputs import Chart
from rag_ecg.review.jobs import (Lease, add_items, commit_results, lease_owner, open_job, pending_batches,
                                 release_lease, renew_lease, start_attempts, status_counts, take_lease)
from rag_ecg.review.outputs import write_outputs
from rag_ecg.review.pipeline import ChartResult
from rag_ecg.review.run import review
from tests.pg_store import copy_rows
from tests.rag_ecg.review.conftest import GOOD, rows_of

ROOT = Path(__file__).resolve().parents[3]
HOST = socket.gethostname()


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


def _busy(job: int, pid) -> str:
    """The one line a run refused a held job gets, naming the holder."""
    return rf"^job {job} is being processed by another run \(pid {pid} on host {HOST}\) since \d{{4}}-"


def _racer(url: str, job_id: int, go, out) -> None:
    """Another run (a forked process): take the job once `go` is set, say how it went, and hold it."""
    store = open_store(url)
    go.wait(120)
    try:
        take_lease(store, job_id, lease_owner())
    except ReviewError as exc:
        out.send(str(exc))
        os._exit(0)
    out.send("won")
    signal.pause()  # holding the job until the test kills this run


def test_one_of_runs_starting_at_once_wins_the_job_and_a_run_that_lost_it_touches_no_chart(store_url, tmp_path):
    """Three processes take the job at the same moment: exactly one wins, the others (and this test) are
    refused with one line naming the winner. Once the winner is SIGKILLed its lease does not block. A run
    whose lease ran out on another host (the database's clock decides) loses the job to a new run and then
    can neither claim a batch (no attempt counted) nor commit one (no row, no thumbnail written)."""
    store = open_store(store_url)
    job, _ = open_job(store, "b" * 64, "dir:/charts", tmp_path, {})
    add_items(store, job, [Chart(f"c{i}.png", f"/charts/c{i}.png", "image") for i in range(4)])
    store.dispose()  # no connection of this process is inherited by the forked runs
    ctx = multiprocessing.get_context("fork")  # the runs start at once, without re-importing torch
    go, pipes = ctx.Event(), [ctx.Pipe(duplex=False) for _ in range(3)]
    runs = [ctx.Process(target=_racer, args=(store_url, job, go, w), daemon=True) for _, w in pipes]
    try:
        for p in runs:
            p.start()
        go.set()
        assert all(r.poll(120) for r, _ in pipes)
        said = {p.pid: r.recv() for p, (r, _) in zip(runs, pipes)}
        winners = [pid for pid, what in said.items() if what == "won"]
        assert len(winners) == 1, said
        for pid, what in said.items():
            assert pid == winners[0] or re.match(_busy(job, winners[0]), what), what
        mine = lease_owner()
        with pytest.raises(ReviewError, match=_busy(job, winners[0])):
            take_lease(store, job, mine)
        winner = next(p for p in runs if p.pid == winners[0])
        winner.kill()
        winner.join(60)
        assert take_lease(store, job, mine) == Lease(job, mine)  # the killed run's lease does not block
    finally:
        for p in runs:
            p.kill()
            p.join(60)

    release_lease(store, job, mine)
    old = take_lease(store, job, "elsewhere:41:old", lease_s=-60)  # a run on another host, stalled 60 s too long
    new = take_lease(store, job, mine)
    batch = next(pending_batches(store, job, 2))
    for stale in (lambda: start_attempts(store, batch, 2, old),
                  lambda: commit_results(store, tmp_path, [ChartResult(batch[0][0], "done", thumb=b"jpeg")], old),
                  lambda: renew_lease(store, job, old.owner)):
        with pytest.raises(ReviewError, match=rf"^job {job}: another run took the job over"):
            stale()
    with store.session() as s:
        items = s.execute(select(ReviewItem.status, ReviewItem.attempts).where(ReviewItem.job_id == job)).all()
    assert items == [("pending", 0)] * 4 and not (tmp_path / "thumbs").exists()
    assert start_attempts(store, batch, 2, new) == []  # the run holding the job claims the batch
    release_lease(store, job, mine)
    take_lease(store, job, "elsewhere:42:live")  # a live lease on another host blocks until it runs out
    with pytest.raises(ReviewError, match=rf"^job {job} is being processed by another run \(pid 42 on host "
                                          rf"elsewhere\)"):
        take_lease(store, job, mine)
    store.dispose()


def test_a_run_whose_lease_was_taken_over_stops_before_it_reviews_a_chart_again(store_url, review_env, tmp_path):
    """Two real review processes on one job (SQLite file, PostgreSQL database): run A pauses after its first
    batch; B is refused, naming A. A then stalls past its lease: B takes the job over and finishes it. When A
    wakes up it stops at its next batch with one line, and the charts B reviewed are not reviewed again
    (every chart counted one attempt, B's results kept)."""
    copy_rows(review_env["url"], store_url)
    charts = tmp_path / "charts"
    charts.mkdir()
    for rel, _, _ in GOOD[:4]:
        shutil.copy(Path(review_env["charts"]) / rel, charts / Path(rel).name)
    out = tmp_path / "out"
    code = ("import sys\n"
            "from rag_ecg.review.run import review\n"
            "def on_batch(b):\n"
            "    print('committed', b.committed, flush=True)\n"
            "    sys.stdin.readline()\n"  # paused here, holding the job, until the test says so
            f"review({str(charts)!r}, {str(out)!r}, store={store_url!r}, index_dir={review_env['index']!r},"
            " workers=1, batch_size=2, progress=False, on_batch=on_batch)\n")
    with open(tmp_path / "a.err", "w") as err:
        run_a = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    kw = dict(store=store_url, index_dir=review_env["index"], workers=1, batch_size=2, progress=False)
    try:
        assert run_a.stdout.readline().startswith("committed 2")
        with pytest.raises(ReviewError, match=_busy(r"\d+", run_a.pid)):
            review(charts, out, **kw)
        store = open_store(store_url)
        with store.session() as s:  # what A's lease is after 15 minutes without a committed batch
            s.execute(update(ReviewJob).values(lease_until=datetime.now(timezone.utc) - timedelta(hours=1)))
        b = review(charts, out, **kw)
        assert (b.resumed, b.processed, b.done, b.pending) == (True, 2, 4, 0)
        with store.session() as s:
            after_b = s.execute(select(ReviewItem.chart_key, ReviewItem.attempts, ReviewItem.finished_at,
                                       ReviewItem.timings).order_by(ReviewItem.id)).all()
        run_a.stdin.write("\n")
        run_a.stdin.flush()
        assert run_a.wait(timeout=300) != 0
    finally:
        run_a.kill()
        run_a.wait(timeout=60)
        run_a.stdout.close()
        run_a.stdin.close()
    last = (tmp_path / "a.err").read_text().strip().splitlines()[-1]
    assert "ReviewError: job" in last and "another run took the job over" in last
    with store.session() as s:
        assert s.execute(select(ReviewItem.chart_key, ReviewItem.attempts, ReviewItem.finished_at,
                                ReviewItem.timings).order_by(ReviewItem.id)).all() == after_b
    assert [a for _, a, _, _ in after_b] == [1, 1, 1, 1]
    store.dispose()
