"""No store password in what a Ray review writes or logs (issue 15): its output folder, its job row, the log
records and Ray's own session folder, while the actors still reach the store (tests/pg_store.py: the store).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import select

from rag_ecg.data.store import ReviewJob, open_store
from rag_ecg.review.run import review
from tests.pg_store import copy_rows, leaks, spelled_out
from tests.rag_ecg.review.conftest import GOOD


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_ray_review_writes_and_logs_no_password(store_url, review_env, tmp_path, caplog, monkeypatch):
    """A Ray review on PostgreSQL: its outputs, its job row, the log records and Ray's own session folder
    (with Ray's export events on: they record each dataset operator's arguments) hold no password, and the
    actors still reach the store (every chart reviewed)."""
    if os.environ.get("RAG_ECG_REQUIRE_RAY") != "1":
        pytest.importorskip("ray", reason="Ray Data not installed (pip install 'ray[data]==2.60.0')")
    import ray

    copy_rows(review_env["url"], store_url)
    url, needles = spelled_out(store_url)
    charts = tmp_path / "charts"
    charts.mkdir()
    for rel, _, _ in GOOD[:4]:
        shutil.copy(Path(review_env["charts"]) / rel, charts / Path(rel).name)
    monkeypatch.setenv("RAY_enable_export_api_write", "1")
    session = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(session))
    try:
        with caplog.at_level(logging.DEBUG):
            s = review(charts, tmp_path / "out", store=url, index_dir=review_env["index"], engine="ray",
                       workers=1, batch_size=4, progress=False)
    finally:
        ray.shutdown()
    try:
        assert (s.done, s.pending) == (4, 0)
        exported = list(session.rglob("event_EXPORT_DATASET_METADATA.log"))
        assert exported and "LoadEmbed" in exported[0].read_text()  # Ray did record the operators
        store = open_store(url)
        with store.session() as ses:
            row = json.dumps(ses.scalar(select(ReviewJob.settings).where(ReviewJob.id == s.job_id)))
        store.dispose()
        assert leaks(needles, tmp_path / "out", session, extra=caplog.text + row) == []
    finally:
        shutil.rmtree(session, ignore_errors=True)
