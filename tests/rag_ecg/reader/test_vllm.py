"""The vLLM backend end to end over real HTTP (tests/openai_server.py on 127.0.0.1).

vLLM itself needs a GPU and its own environment; its OpenAI-compatible API is reproduced by a real HTTP
server answering from the tiny LLaVA-NeXT (hf backend) or from scripted answers, with injected delays
and errors to exercise timeouts, retries with backoff, and the no-retry rule for 4xx.
"""
from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("openai")
from PIL import Image  # noqa: E402

from rag_ecg.errors import BackendError  # noqa: E402
from rag_ecg.reader.backends import get_backend  # noqa: E402
from rag_ecg.reader.interpret import interpret  # noqa: E402
from rag_ecg.reader.messages import decode_data_url  # noqa: E402
from rag_ecg.reader.prompts import build_messages, format_evidence  # noqa: E402
from tests.openai_server import OpenAITestServer, ptbxl_evidence, tiny_llava_dir  # noqa: E402
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer  # noqa: E402


@pytest.fixture(scope="module")
def evidence(ptbxl_dir):
    return ptbxl_evidence(ptbxl_dir)  # case ids 1000-1005


@pytest.fixture(scope="module")
def tiny_hf():
    be = get_backend("hf", model_path=str(tiny_llava_dir()), device="cpu", max_new_tokens=8)
    yield be
    be.close()


def client(srv: OpenAITestServer, **kw):
    opts = dict(base_url=srv.url, timeout_s=5.0, max_retries=2, backoff_s=0.01, max_tokens=8)
    return get_backend("vllm", **{**opts, **kw})


def page() -> Image.Image:
    img = Image.new("RGB", (200, 100), "white")
    img.paste((0, 0, 0), (20, 40, 180, 42))
    return img


def test_end_to_end_with_tiny_model_retries_once_then_flags_unparsed(tiny_hf, evidence):
    with OpenAITestServer(backend=tiny_hf) as srv:
        be = client(srv)
        r = interpret(page(), evidence, be, retries=1)
    assert be.model == "tiny-llava"  # resolved from /v1/models
    assert len(srv.requests) == 2  # the nonsense answer was retried exactly once
    first, second = srv.requests
    user = first["messages"][1]["content"]
    assert user[0]["type"] == "image_url" and decode_data_url(user[0]["image_url"]["url"]).size == (200, 100)
    assert format_evidence(evidence) in user[1]["text"]
    assert first["max_tokens"] == 8 and first["temperature"] == 0.0
    assert second["messages"][2]["role"] == "assistant"
    assert second["messages"][3]["content"].startswith("Your previous answer could not be used: ")
    assert not r.parsed and r.raw_text == tiny_hf.generate(second["messages"], [])
    assert r.backend == "vllm" and r.model == "tiny-llava"


def test_malformed_then_good_answer_is_parsed_and_citations_checked(evidence):
    good = json.loads(json.dumps(GOOD_JSON))
    good["findings"].append({"text": "as in an unlisted case", "cited": [31337]})
    truncated = answer(GOOD_JSON)[:-60]
    with OpenAITestServer(replies=[truncated, answer(good)]) as srv:
        r = interpret(page(), evidence, client(srv))
    assert len(srv.requests) == 2 and "not closed" in srv.requests[1]["messages"][3]["content"]
    assert r.parsed and r.rate_bpm == 75.0 and [d.code for d in r.diagnoses] == ["LAFB", "IMI"]
    assert [d.unknown for d in r.dropped_citations] == [[31337]]
    assert set(r.cited_case_ids) <= set(evidence.case_ids)


def test_a_500_once_is_retried(evidence):
    with OpenAITestServer(replies=[answer(GOOD_JSON)]) as srv:
        srv.fail_next = 1
        r = interpret(page(), evidence, client(srv, model="tiny-llava"))
    assert r.parsed and len(srv.requests) == 2


def test_always_500_fails_after_retries_with_a_clear_error(evidence):
    with OpenAITestServer() as srv:
        srv.always_status = 500
        be = client(srv, model="tiny-llava")
        with pytest.raises(BackendError, match=r"vLLM server at http://127\.0\.0\.1:\d+/v1: generate failed "
                                               r"after 3 attempt\(s\): HTTP 500: injected HTTP 500"):
            be.generate(build_messages(evidence, page()), [page()])
    assert len(srv.requests) == 3


def test_400_is_not_retried(evidence):
    """A 400 is not a transient failure; with the JSON schema sent it is asked once more without it (the
    server may not constrain decoding), never more."""
    for structured, sent in ((False, 1), (True, 2)):
        with OpenAITestServer() as srv:
            srv.always_status = 400
            with pytest.raises(BackendError, match=r"rejected the request to generate \(HTTP 400: injected HTTP 400\)"):
                client(srv, model="tiny-llava", structured=structured).generate(build_messages(evidence, None), [])
        assert len(srv.requests) == sent and "response_format" not in srv.requests[-1]


def test_unknown_model_is_a_4xx_error(evidence):
    with OpenAITestServer(replies=["x"]) as srv:
        with pytest.raises(BackendError, match="HTTP 404: The model `pulse-7b` does not exist"):
            client(srv, model="pulse-7b").generate(build_messages(evidence, None), [])


def test_slow_server_times_out(evidence):
    with OpenAITestServer(replies=["late"] * 3) as srv:
        srv.delay_s = 1.0
        be = client(srv, model="tiny-llava", timeout_s=0.2, max_retries=1)
        with pytest.raises(BackendError, match=r"failed after 2 attempt\(s\): timed out after 0\.2 s"):
            be.generate(build_messages(evidence, None), [])
    assert len(srv.requests) == 2


def test_unreachable_server_names_the_url(evidence):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = get_backend("vllm", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(BackendError, match=rf"vLLM server at http://127\.0\.0\.1:{port}/v1: list models failed "
                                           r"after 2 attempt\(s\): unreachable"):
        be.generate(build_messages(evidence, None), [])


def test_errors_name_the_server_without_its_password(evidence):
    """A base_url with user:password (a proxy in front of vLLM) is used as given, named with *** instead."""
    with OpenAITestServer() as srv:
        url = srv.url.replace("http://", "http://alice:p4ss-w0rd@")
        for status, what in ((500, "generate failed after 1 attempt"), (400, "rejected the request")):
            srv.always_status = status
            be = get_backend("vllm", base_url=url, api_key="sk-secret", model="tiny-llava", max_retries=0)
            with pytest.raises(BackendError) as err:
                be.generate(build_messages(evidence, None), [])
            assert what in str(err.value) and "alice:***@127.0.0.1" in str(err.value)
            assert "p4ss-w0rd" not in str(err.value) and "sk-secret" not in str(err.value)
    assert srv.requests  # the server was reached through the URL with credentials
