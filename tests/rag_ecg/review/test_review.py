"""Batch chart review end to end: real PTB-XL charts + planted bad files -> statuses, outputs, resume.

The charts, store and index are conftest's (`review_env`), shared with test_review_html / test_review_ray;
`uninterrupted` is one clean run that the resumed and killed runs must reproduce.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag_ecg.data.store import Case, ReviewItem, ReviewJob, open_store
from rag_ecg.errors import BackendError, ConfigError
from rag_ecg.review.config import ReviewConfig, ReviewError
from rag_ecg.review.inputs import discover, parse_store_query
from rag_ecg.review.jobs import job_key
from rag_ecg.review.outputs import item_row
from rag_ecg.review.run import review
from rag_ecg.search.retrieve import IndexNotReadyError
from tests.openai_server import OpenAITestServer
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer
from tests.rag_ecg.review.conftest import (ALL_KEYS, BAD, BATCH, GOOD, GOOD_KEYS, comparable, copy_db, fresh_store,
                                           rows_of)

ROOT = Path(__file__).resolve().parents[3]


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_batch_records_the_right_status_for_every_chart(uninterrupted):
    s, out = uninterrupted["summary"], uninterrupted["out"]
    rows = rows_of(out)
    assert sorted(rows) == ALL_KEYS  # notes.txt and the .dat files are not charts
    assert (s["total"], s["done"], s["error"], s["pending"], s["processed"]) == (13, 7, 6, 0, 13)
    for key, phrase in BAD.items():
        err = rows[key]["error"]
        assert rows[key]["status"] == "error" and phrase in err, (key, err)
        assert "\n" not in err and Path(key).name in err  # one line naming the file
    for key in GOOD_KEYS:
        r = rows[key]
        assert r["status"] == "done" and r["error"] is None, (key, r["error"])
        assert len(r["neighbours"]) == 8 and r["neighbours"][0]["score"] >= r["neighbours"][-1]["score"]
        assert r["report"]["backend"] == "retrieval" and r["impression"]
        assert set(r["cited_cases"]) <= {n["case_id"] for n in r["neighbours"]}  # citations are retrieved cases
        assert set(r["timings"]) >= {"load", "embed", "search", "report", "total"}
    assert set(rows["bad/gradient.png"]["timings"]) >= {"load", "embed", "search"}  # failed at the check
    assert set(rows["bad/empty.png"]["timings"]) == {"load", "total"}  # failed at loading


def test_outputs_are_complete_and_consistent(uninterrupted):
    out = uninterrupted["out"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["chart"] for r in table) == ALL_KEYS
    by = {r["chart"]: r for r in table}
    jl = rows_of(out)
    for key in GOOD_KEYS:
        assert by[key]["status"] == "done" and by[key]["neighbours"].count(":") == 8
        assert by[key]["cited_cases"].split() == [str(c) for c in jl[key]["cited_cases"]]
        if jl[key]["diagnoses"]:
            assert float(by[key]["top_confidence"]) == pytest.approx(jl[key]["diagnoses"][0]["confidence"], abs=1e-4)
    assert by["bad/empty.png"]["error"] == jl["bad/empty.png"]["error"]
    thumbs = {p.name for p in (out / "thumbs").iterdir()}
    db = open_store(uninterrupted["url"])
    with db.session() as s:
        items = {i.chart_key: i for i in s.query(ReviewItem)}
    for key in GOOD_KEYS:
        assert f"chart-{items[key].id}.jpg" in thumbs
        assert all(f"case-{n['case_id']}.jpg" in thumbs for n in jl[key]["neighbours"])
    assert f"chart-{items['bad/gradient.png'].id}.jpg" in thumbs  # loaded fine, then judged not an ECG
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 7, "error": 6, "pending": 0} and manifest["versions"]["rag_ecg"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    db.dispose()


def test_rerun_resumes_the_finished_job_without_redoing_anything(review_env, uninterrupted, tmp_path):
    # a copy of the finished job's store: the same command finds the job and has nothing left to do
    (tmp_path / "db").mkdir()
    url = copy_db(uninterrupted["url"], tmp_path / "db" / "resumed.db")
    before = rows_of(uninterrupted["out"])
    s = review(review_env["charts"], tmp_path / "out2", store=url, index_dir=review_env["index"], workers=1,
               batch_size=BATCH, progress=False)
    assert s.resumed and s.processed == 0 and (s.done, s.error, s.total) == (7, 6, 13)
    assert s.key == uninterrupted["summary"]["key"]
    after = rows_of(tmp_path / "out2")  # outputs regenerated into the new folder, thumbnails re-made
    assert {k: comparable(v) for k, v in after.items()} == {k: comparable(v) for k, v in before.items()}
    assert len(list((tmp_path / "out2" / "thumbs").glob("chart-*.jpg"))) == 8  # 7 good + the gradient


def test_killed_run_resumes_to_the_same_results(review_env, uninterrupted, tmp_path):
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    code = (
        "from rag_ecg.review.run import review\n"
        "def on_batch(b):\n"
        "    print('committed', b.committed, flush=True)\n"
        f"review({review_env['charts']!r}, {str(out)!r}, store={url!r}, index_dir={review_env['index']!r},"
        f" workers=2, batch_size={BATCH}, progress=False, on_batch=on_batch)\n"
        "print('finished', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen, loaders = [], []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.startswith("committed") and int(line.split()[1]) >= BATCH:
            loaders = children_of(proc.pid)  # the chart loader processes
            proc.send_signal(signal.SIGKILL)  # mid-run: the next batch is already loading
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, seen
    assert len(loaders) == 2
    deadline = time.monotonic() + 15
    while any(alive(p) for p in loaders) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in loaders), "loader processes outlived the killed review"
    store = open_store(url)
    with store.session() as s:
        items = list(s.query(ReviewItem))
        assert s.query(ReviewJob).count() == 1
    finished = [i for i in items if i.status != "pending"]
    assert len(items) == 13 and BATCH <= len(finished) < 13  # nothing lost, some work kept
    assert all(i.finished_at is not None for i in finished)
    assert all(i.report is None and i.neighbours is None for i in items if i.status == "pending")

    s2 = review(review_env["charts"], out, store=store, index_dir=review_env["index"], workers=2,
                batch_size=BATCH, progress=False)
    assert s2.resumed and s2.processed == 13 - len(finished) and (s2.done, s2.error, s2.pending) == (7, 6, 0)
    with store.session() as s:
        assert s.query(ReviewItem).count() == 13  # no duplicates
        attempts = {i.chart_key: i.attempts for i in s.query(ReviewItem)}
    assert max(attempts.values()) <= 2 and min(attempts.values()) == 1
    resumed, clean = rows_of(out), rows_of(uninterrupted["out"])
    assert {k: comparable(v) for k, v in resumed.items()} == {k: comparable(v) for k, v in clean.items()}
    store.dispose()


def test_csv_list_and_store_query_inputs(review_env, tmp_path):
    charts = Path(review_env["charts"])
    listing = tmp_path / "list" / "charts.csv"
    listing.parent.mkdir()
    rel = os.path.relpath(charts, listing.parent)
    listing.write_text("path,patient\n"
                       f"{rel}/good/page.png,a\n"
                       f"{charts}/good/wfdb/04385_lr,b\n"  # WFDB record without extension
                       f"{rel}/good/page.png,a\n"  # duplicate: one chart
                       "missing/nowhere.png,c\n")
    url = fresh_store(review_env, tmp_path)
    s = review(listing, tmp_path / "out", store=url, index_dir=review_env["index"], workers=1, batch_size=BATCH,
               progress=False)
    rows = rows_of(tmp_path / "out")
    assert (s.total, s.done, s.error) == (3, 2, 1)
    assert rows[f"{charts}/good/wfdb/04385_lr.hea"]["status"] == "done"
    assert rows["missing/nowhere.png"]["error"] == "nowhere.png: no such file"

    store = open_store(url)
    s = review("store:source=ptbxl,fold=9,limit=3", tmp_path / "out-store", store=store,
               index_dir=review_env["index"], workers=1, batch_size=BATCH, progress=False)
    assert (s.total, s.done) == (3, 3)
    with store.session() as ses:
        for key, row in rows_of(tmp_path / "out-store").items():
            case = ses.get(Case, int(key.removeprefix("case:")))
            assert case.fold == 9 and case.source == "ptbxl"
            patients = {ses.get(Case, n["case_id"]).patient_id for n in row["neighbours"]}
            assert case.patient_id not in patients  # the query's own patient is never its evidence
    store.dispose()


def test_text_backend_calls_run_concurrently_and_a_dead_backend_leaves_charts_pending(review_env, tmp_path):
    """The vllm backend over real HTTP (tests/openai_server.py): --workers parallel requests; a server
    that always fails stops the run with every chart it reached left pending for the next run."""
    pytest.importorskip("openai")
    folder = tmp_path / "charts"
    folder.mkdir()
    for rel, _, _ in GOOD[:4]:
        (folder / Path(rel).name).write_bytes((Path(review_env["charts"]) / rel).read_bytes())
    url = fresh_store(review_env, tmp_path)
    with OpenAITestServer(replies=[answer(GOOD_JSON)] * 4) as srv:
        srv.delay_s = 0.3
        opts = dict(base_url=srv.url, timeout_s=10.0, max_retries=0, backoff_s=0.01, max_tokens=64)
        s = review(folder, tmp_path / "out", store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts, workers=4, batch_size=BATCH, progress=False)
    assert (s.done, s.error) == (4, 0) and srv.max_in_flight >= 2
    assert all(r["image_url"]["url"].startswith("data:image/") for req in srv.requests
               for r in req["messages"][1]["content"] if r["type"] == "image_url")
    for row in rows_of(tmp_path / "out").values():
        assert row["report"]["backend"] == "vllm" and row["report"]["parsed"]
        assert set(row["cited_cases"]) <= {n["case_id"] for n in row["neighbours"]}  # unknown ids dropped

    url2 = fresh_store(review_env, tmp_path / "dead")
    with OpenAITestServer() as srv:
        srv.always_status = 500
        opts = dict(base_url=srv.url, model="tiny-llava", timeout_s=5.0, max_retries=0, backoff_s=0.01)
        with pytest.raises(BackendError, match="backend vllm: every chart of the last batch failed"):
            review(folder, tmp_path / "out-dead", store=url2, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts, workers=2, batch_size=BATCH, progress=False)
    store = open_store(url2)
    with store.session() as s:
        items = list(s.query(ReviewItem))
    assert len(items) == 4 and all(i.status == "pending" and "500" in (i.error or "") for i in items)
    assert (tmp_path / "out-dead" / "results.csv").exists()  # outputs are written even when a run stops

    # a chart whose earlier runs all died on it is given up (max_attempts), without calling the backend ...
    cfg = ReviewConfig(backend="vllm", backend_options=opts, workers=2, batch_size=BATCH, max_attempts=1)
    s = review(folder, tmp_path / "out-dead", store=store, index_dir=review_env["index"], config=cfg,
               progress=False)
    assert (s.error, s.pending, s.processed) == (4, 0, 4)
    assert all("gave up after 1 attempts" in r["error"] and "500" in r["error"]
               for r in rows_of(tmp_path / "out-dead").values())
    # ... and retry_errors puts errors back in the queue once the backend works again
    with OpenAITestServer(replies=[answer(GOOD_JSON)] * 4) as srv:
        opts = {**opts, "base_url": srv.url}
        cfg = ReviewConfig(backend="vllm", backend_options=opts, workers=2, batch_size=BATCH, retry_errors=True)
        s = review(folder, tmp_path / "out-dead", store=store, index_dir=review_env["index"], config=cfg,
                   progress=False)
    assert (s.done, s.error, s.processed, s.resumed) == (4, 0, 4, True)
    store.dispose()


def test_inputs_settings_and_job_keys_are_checked(review_env, tmp_path):
    assert parse_store_query("store:source=ptbxl, fold=9,limit=5") == {"source": "ptbxl", "fold": 9, "limit": 5}
    with pytest.raises(ReviewError, match="unknown filter 'patient'"):
        parse_store_query("store:patient=3")
    with pytest.raises(ReviewError, match="fold must be an integer"):
        parse_store_query("store:fold=nine")
    with pytest.raises(ReviewError, match="nowhere: no such file or folder"):
        discover(tmp_path / "nowhere")
    bad_csv = tmp_path / "list.csv"
    bad_csv.write_text("file,name\na.png,x\n")
    with pytest.raises(ReviewError, match="no 'path' column \\(columns: file, name\\)"):
        discover(bad_csv)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReviewError, match="no charts found"):
        discover(tmp_path / "empty")
    desc, charts = discover(review_env["charts"], limit=5)
    assert desc.startswith("dir:") and [c.key for c in charts] == ALL_KEYS[:5]
    with pytest.raises(ReviewError, match="engine 'spark'"):
        ReviewConfig(engine="spark")
    cfg = ReviewConfig(k=5, backend="vllm", backend_options={"base_url": "http://x/v1", "model": "m"})
    index = {"path": "/i", "encoder_hash": "h", "built": "t"}
    base = job_key("dir:/x", cfg, index)
    moved = ReviewConfig.from_dict({**cfg.__dict__, "workers": 9, "batch_size": 3,
                                    "backend_options": {"base_url": "http://y/v1", "model": "m"}})
    assert job_key("dir:/x", moved, index) == base  # where the server is / how fast: same job
    assert job_key("dir:/x", ReviewConfig.from_dict({**cfg.__dict__, "k": 6}), index) != base
    assert job_key("dir:/x", cfg, {**index, "encoder_hash": "h2"}) != base  # a rebuilt index: a new job
    with pytest.raises(ConfigError, match="unknown ReviewConfig field\\(s\\) kk"):
        ReviewConfig.from_dict({"kk": 1})
    with pytest.raises(IndexNotReadyError, match="no finished index here"):
        review(review_env["charts"], tmp_path / "o", store=f"sqlite:///{tmp_path / 'x.db'}",
               index_dir=tmp_path / "noindex", progress=False)


def test_item_row_flattens_a_report(uninterrupted):
    store = open_store(uninterrupted["url"])
    with store.session() as s:
        item = s.query(ReviewItem).filter(ReviewItem.chart_key == "good/page.png").one()
        row = item_row(item)
    assert row["chart"] == "good/page.png" and row["status"] == "done"
    assert row["diagnoses"] == sorted(row["diagnoses"], key=lambda d: -d["confidence"])
    assert row["timings"]["total"] == pytest.approx(sum(row["timings"][k] for k in ("load", "embed", "search", "report")))
    store.dispose()
