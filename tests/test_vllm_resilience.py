"""A failing or hung vLLM server: the openai client's own retries (Retry-After honoured) and the circuit
breaker that stops a batch review cleanly, charts left pending, instead of waiting out every chart.

Against tests/fake_vllm.py on 127.0.0.1, through real HTTP; the review runs on the small real store and
tiny index of tests/conftest.py.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")
from sqlalchemy import select  # noqa: E402

from rag_ecg.errors import BackendError  # noqa: E402
from rag_ecg.paper.render import render_page  # noqa: E402
from rag_ecg.data.records import read_wfdb  # noqa: E402
from rag_ecg.reader.backends import get_backend  # noqa: E402
from rag_ecg.reader.circuit import ServerUnreachableError  # noqa: E402
from rag_ecg.reader.prompts import build_messages  # noqa: E402
from rag_ecg.data.store import ReviewItem  # noqa: E402
from rag_ecg.review.run import review  # noqa: E402
from tests.fake_vllm import FakeVLLM  # noqa: E402
from tests.openai_server import ptbxl_evidence  # noqa: E402


@pytest.fixture(scope="module")
def evidence(ptbxl_dir):
    return ptbxl_evidence(ptbxl_dir)


def client(srv: FakeVLLM, **kw):
    return get_backend("vllm", **{"base_url": srv.url, "model": "pulse-7b", "timeout_s": 10.0, **kw})


def test_5xx_is_retried_by_the_client_after_the_wait_the_server_asks_for(evidence):
    """Two 503s with `Retry-After: 1`, then an answer: three requests, and the first retry waited at least
    the second the server asked for, not the 10 ms `backoff_s` (a lower bound only: a sleep never ends early)."""
    with FakeVLLM() as srv:
        srv.fail_next, srv.fail_status, srv.retry_after = 2, 503, "1"
        text = client(srv, max_retries=2, backoff_s=0.01).generate(build_messages(evidence, None, cot=False), [])
    assert len(srv.requests) == 3 and text.startswith("{")
    assert srv.times[1] - srv.times[0] >= 0.95


def test_breaker_opens_after_consecutive_failures_and_sends_nothing_more(evidence):
    with FakeVLLM() as srv:
        srv.fail_next, srv.fail_status = 100, 500
        be = client(srv, max_retries=0, breaker_failures=3, breaker_cooldown_s=1.0)
        msgs = build_messages(evidence, None, cot=False)
        for _ in range(3):
            with pytest.raises(BackendError, match="generate failed after 1 attempt"):
                be.generate(msgs, [])
        with pytest.raises(ServerUnreachableError, match=r"vLLM server at http://127\.0\.0\.1:\d+/v1 is unreachable "
                                                         r"\(3 calls in a row failed; last: HTTP 500"):
            be.generate(msgs, [])
        assert len(srv.requests) == 3  # the fourth call never reached the server
        srv.fail_next = 0
        time.sleep(1.1)  # past the cooldown: one trial call goes through, succeeds, and closes the breaker
        be.generate(msgs, [])
        be.generate(msgs, [])
    assert len(srv.requests) == 5 and not be.breaker.is_open


def test_a_hung_server_is_noticed_after_one_timeout(evidence):
    """The chat request times out and the server does not even list its models: the breaker opens at once,
    so the next chart fails without waiting."""
    with FakeVLLM() as srv:
        srv.hang_s, srv.hang_models = 3.0, True
        be = client(srv, timeout_s=0.3, max_retries=0, breaker_failures=3, max_model_len=4096)
        msgs = build_messages(evidence, None, cot=False)
        with pytest.raises(BackendError, match="timed out after 0.3 s"):
            be.generate(msgs, [])
        with pytest.raises(ServerUnreachableError, match="does not answer a health check"):
            be.generate(msgs, [])
    assert len(srv.requests) == 1


def test_review_stops_cleanly_with_charts_pending_when_the_server_fails(tmp_path, ptbxl_dir, tiny_index,
                                                                        scratch_store):
    """Every request fails (HTTP 500): after `breaker_failures` of them the rest of the batch fails without a
    request, the run stops with one line naming the unreachable server, and every chart stays pending with
    no attempt used, so the next run (server back) reads them all."""
    charts = tmp_path / "charts"
    charts.mkdir()
    for rec in ("04240_lr", "04319_lr", "04192_lr", "04355_lr"):
        render_page(read_wfdb(ptbxl_dir / "records100" / rec), preset="clean", seed=0, dpi=100).save(
            charts / f"{rec}.png")
    opts = dict(max_retries=0, breaker_failures=2, max_cases=2, cot=False)
    with FakeVLLM() as srv:
        srv.fail_next, srv.fail_status = 100, 500
        with pytest.raises(BackendError, match=r"every chart of the last batch failed \(.*is unreachable \(2 calls "
                                               r"in a row failed; last: HTTP 500") as err:
            review(charts, tmp_path / "out", store=scratch_store, index_dir=tiny_index["index"], backend="vllm",
                   backend_options={**opts, "base_url": srv.url}, workers=1, batch_size=4, progress=False)
    assert len(srv.requests) == 2 and "\n" not in str(err.value)
    with scratch_store.session() as s:
        items = list(s.scalars(select(ReviewItem)))
    assert len(items) == 4 and all(i.status == "pending" and i.attempts == 0 for i in items)
    assert sum("is unreachable" in (i.error or "") for i in items) == 2
    with FakeVLLM() as srv:
        s = review(charts, tmp_path / "out", store=scratch_store, index_dir=tiny_index["index"], backend="vllm",
                   backend_options={**opts, "base_url": srv.url}, workers=1, batch_size=4, progress=False)
    assert (s.done, s.pending, s.error, s.resumed) == (4, 0, 0, True) and len(srv.requests) == 4
