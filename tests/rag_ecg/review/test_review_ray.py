"""The Ray Data engine on a local Ray instance gives the local engine's results.

"The same": Ray actors start torch with one thread, and oneDNN then picks kernels whose sums round
differently in the last bit; neighbours rank by similarity rounded to 1e-5, then case id
(`rag_ecg.search.evidence.rank_hits`), so that noise cannot reorder neighbours or citations (it did on a
fresh machine), and scores compare within 1e-4 (conftest.assert_close).

Ray is an optional extra (`ray[data]`); the test is skipped when it is not installed, unless
RAG_ECG_REQUIRE_RAY=1.
"""
from __future__ import annotations

import json
import os

import pytest

from rag_ecg.data.store import ReviewItem, open_store
from rag_ecg.review.run import review
from tests.rag_ecg.review.conftest import ALL_KEYS, BATCH, assert_close, comparable, fresh_store, rows_of

if os.environ.get("RAG_ECG_REQUIRE_RAY") != "1":
    pytest.importorskip("ray", reason="Ray Data not installed (pip install 'ray[data]==2.60.0')")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_engine_matches_the_local_engine(local_ray, review_env, uninterrupted, tmp_path):
    url = fresh_store(review_env, tmp_path)
    s = review(review_env["charts"], tmp_path / "out", store=url, index_dir=review_env["index"], engine="ray",
               workers=1, batch_size=BATCH, progress=False)  # one actor per stage: quick to start on 2 cores
    assert (s.total, s.done, s.error, s.pending, s.processed) == (14, 7, 7, 0, 13)
    assert s.key == uninterrupted["summary"]["key"]  # the engine does not change results: same job
    ray_rows, local_rows = rows_of(tmp_path / "out"), rows_of(uninterrupted["out"])
    assert sorted(ray_rows) == ALL_KEYS
    for key in ALL_KEYS:
        assert_close(comparable(ray_rows[key]), comparable(local_rows[key]), key)
        assert set(ray_rows[key]["timings"]) == set(local_rows[key]["timings"]), key
    thumbs = {p.name for p in (tmp_path / "out" / "thumbs").iterdir()}
    store = open_store(url)
    with store.session() as ses:
        items = {i.chart_key: i for i in ses.query(ReviewItem)}
    assert all(f"chart-{items[k].id}.jpg" in thumbs for k in ALL_KEYS if ray_rows[k]["status"] == "done")
    never_loaded = {k for k, i in items.items() if i.attempts == 0}
    assert never_loaded == {"notes.txt"}  # refused at discovery (not a picture or record): never loaded
    assert all(i.attempts == 1 for k, i in items.items() if k not in never_loaded)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job"]["settings"]["review"]["engine"] == "ray"
    store.dispose()

    again = review(review_env["charts"], tmp_path / "out", store=url, index_dir=review_env["index"],
                   engine="ray", workers=1, batch_size=BATCH, progress=False)
    assert again.resumed and again.processed == 0  # a finished job: Ray is not even asked
