"""The vllm reader fits its prompt into the server's window and asks for schema-constrained JSON.

Against tests/fake_vllm.py on 127.0.0.1: a server that reports `max_model_len`, counts image tokens with
transformers' own LlavaNextProcessor arithmetic, refuses (HTTP 400, vLLM's wording) whatever does not fit,
and writes a schema instance when sent `response_format`. Evidence is real PTB-XL rows.
"""
from __future__ import annotations

import html
import json

import pytest

pytest.importorskip("openai")
import openai  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from rag_ecg.errors import BackendError, InputError  # noqa: E402
from rag_ecg.reader.backends import backend_settings, get_backend  # noqa: E402
from rag_ecg.reader.interpret import interpret  # noqa: E402
from rag_ecg.reader.messages import to_openai_messages  # noqa: E402
from rag_ecg.reader.parse import parse_answer  # noqa: E402
from rag_ecg.reader.prompts import build_messages  # noqa: E402
from rag_ecg.reader.report_render import render_html, render_text  # noqa: E402
from rag_ecg.reader.report_schema import ReportAnswer, answer_schema  # noqa: E402
from rag_ecg.reader.token_budget import PromptTooLongError, VisionGrid, estimate_tokens, image_tokens  # noqa: E402
from tests.fake_vllm import FakeVLLM, hf_image_tokens  # noqa: E402
from tests.openai_server import EVIDENCE_ECG_IDS, ptbxl_evidence, tiny_llava_dir  # noqa: E402
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer  # noqa: E402

PAGE = (1600, 1131)  # a review page: A4 landscape at the longest side review hands text backends


@pytest.fixture(scope="module")
def evidence(ptbxl_dir):
    return ptbxl_evidence(ptbxl_dir, EVIDENCE_ECG_IDS + ("103", "24"))  # 8 cases, ids 1000-1007


def page() -> Image.Image:
    img = Image.new("RGB", PAGE, "white")
    img.paste((0, 0, 0), (40, 500, 1560, 503))
    return img


def client(srv: FakeVLLM, **kw):
    return get_backend("vllm", **{"base_url": srv.url, "timeout_s": 10.0, "max_retries": 0, **kw})


def test_image_tokens_are_llava_nexts_own_count():
    """The formula equals transformers' LlavaNextProcessor for PULSE's grid (2,438 for a letter page, as
    docs/serving.md says) and the number of <image> tokens the tiny LLaVA-NeXT's real processor expands."""
    sizes = [(2200, 1700), (1650, 1275), (3300, 2550), (1000, 600), PAGE, (200, 100), (600, 1000), (336, 336),
             (1, 5000), (4999, 7)]
    assert [image_tokens(w, h) for w, h in sizes] == [hf_image_tokens(w, h) for w, h in sizes]
    assert image_tokens(2200, 1700) == 2438 and image_tokens(1000, 600) == 1948
    proc = AutoProcessor.from_pretrained(tiny_llava_dir())
    grid = VisionGrid.from_model_dir(tiny_llava_dir())
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for w, h in [(200, 100), (100, 200), (333, 257), (56, 56)]:
        ids = proc(images=[Image.new("RGB", (w, h))], text="<image>\nhi", return_tensors="pt")["input_ids"][0]
        assert int((ids == image_id).sum()) == image_tokens(w, h, grid), (w, h)


def test_default_prompt_is_fitted_into_the_window_lowest_ranked_cases_dropped(evidence):
    """The full step-by-step prompt with 8 cases and a 1,024-token answer does not fit PULSE's 4,096 tokens
    (the server says 400); the client drops the lowest-ranked cases, caps the answer to the room left, says
    so in the report, and checks citations against the cases shown."""
    with FakeVLLM(max_model_len=4096) as srv:
        naive = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 4096"):
            naive.chat.completions.create(model="pulse-7b", max_tokens=1024,
                                          messages=to_openai_messages(build_messages(evidence, page()), [page()]))
        be = client(srv)
        r = interpret(page(), evidence, be)
    req = srv.requests[-1]
    assert len(srv.requests) == 2 and srv.prompts[-1] + req["max_tokens"] <= 4096
    assert 400 <= req["max_tokens"] <= 1024
    shown = [int(x) for x in req["response_format"]["json_schema"]["schema"]["$defs"]["StatementAnswer"]
             ["properties"]["cited"]["items"]["enum"]]
    assert shown == list(range(1000, 1000 + len(shown))) and 1 <= len(shown) < 8  # the best-ranked ones
    note = r.notes[0]
    assert f"evidence cut to {len(shown)} of 8 case(s)" in note and "4,096-token window" in note
    assert note.endswith(", ".join(f"case {c}" for c in range(1000 + len(shown), 1008)))
    assert r.parsed and set(r.cited_case_ids) <= set(shown) and len(r.retrieval.cases) == 8
    assert f"Note: {note}" in render_text(r) and f"<li>{html.escape(note)}</li>" in render_html(r)


def test_server_tokenize_counts_exactly_and_the_estimate_is_safe(evidence):
    """With the server's /tokenize the client's count is the server's own, so more evidence fits than with
    the estimate; the estimate never counts less than the server does."""
    msgs = build_messages(evidence, page())
    with FakeVLLM(max_model_len=4096, tokenize=True) as srv:
        be = client(srv)
        exact, how = be.count(msgs, [page()])
        r_exact = interpret(page(), evidence, be)
    assert how == "counted by the server" and srv.tokenize_calls >= 1
    with FakeVLLM(max_model_len=4096) as srv2:
        be2 = client(srv2)
        estimate, how2 = be2.count(msgs, [page()])
        r_est = interpret(page(), evidence, be2)
    assert how2 == "estimated" and estimate >= exact
    shown_exact = len(r_exact.retrieval.cases) - _cut(r_exact)
    assert shown_exact > len(r_exact.retrieval.cases) - _cut(r_est)
    # the server's count of what was finally sent equals the client's count of it
    with FakeVLLM(max_model_len=4096, tokenize=True) as srv3:
        be3 = client(srv3)
        fitted = be3.prepare(evidence, page(), cot=True)
        be3.generate(fitted.messages, [page()])
    assert srv3.prompts == [fitted.prompt_tokens]


def _cut(r) -> int:
    return 0 if not r.notes else 8 - int(r.notes[0].split("evidence cut to ")[1].split(" ")[0])


def test_a_page_that_cannot_fit_is_the_charts_error_not_the_servers(evidence):
    with FakeVLLM(max_model_len=2600) as srv:
        with pytest.raises(PromptTooLongError, match="leaving fewer than 400 of the model's 2,600-token window") as e:
            interpret(page(), evidence, client(srv))
    assert isinstance(e.value, InputError) and not isinstance(e.value, BackendError) and not srv.requests


def test_the_schema_is_the_parsers_report(evidence):
    """What the schema admits, the parser reads (a constrained answer parses); the parser's example answer
    is a schema instance; cited ids are pinned to the cases shown; reasoning comes first for step-by-step."""
    ReportAnswer.model_validate({**GOOD_JSON, "findings": [GOOD_JSON["findings"][0]]})
    schema = answer_schema([1001, 1000], reasoning=True)
    assert list(schema["properties"])[0] == "reasoning" and schema["required"][0] == "reasoning"
    assert schema["$defs"]["DiagnosisAnswer"]["properties"]["cited"]["items"]["enum"] == [1000, 1001]
    assert answer_schema([])["$defs"]["StatementAnswer"]["properties"]["cited"]["maxItems"] == 0
    with FakeVLLM(max_model_len=None) as srv:  # a window the server does not report: no fitting, no notes
        r = interpret(page(), evidence, client(srv, max_cases=3, cot=False))
    body = srv.requests[0]
    assert len(srv.requests) == 1 and r.parsed and not r.notes  # valid by construction: no retry
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert "reasoning" not in fmt["json_schema"]["schema"]["properties"]  # --no-cot: JSON alone
    assert body["max_tokens"] == 1024 and r.cited_case_ids == [1000]
    assert parse_answer(json.dumps(ReportAnswer.model_validate_json(r.raw_text).model_dump())).parsed


def test_a_server_that_cannot_constrain_falls_back_to_the_lenient_parser(evidence):
    truncated = answer(GOOD_JSON)[:-60]
    with FakeVLLM(max_model_len=8192, structured=False, replies=[truncated, answer(GOOD_JSON), "x"]) as srv:
        be = client(srv)
        r = interpret(page(), evidence, be)
        be.generate(build_messages(evidence, None), [])
    sent = [("response_format" in q) for q in srv.requests]
    assert sent == [True, False, False, False]  # refused once, then never sent again
    assert r.parsed and r.rate_bpm == 75.0 and "not closed" in srv.requests[2]["messages"][-1]["content"]


def test_a_400_about_the_length_is_resent_with_the_room_the_server_names(evidence):
    """A client told a wrong window (8,192) sends too much; the server's 400 names its window and count, and
    the one resend fits."""
    with FakeVLLM(max_model_len=4096) as srv:
        be = client(srv, max_model_len=8192, max_cases=2, max_tokens=3000)
        r = interpret(page(), evidence, be)
    assert [q["max_tokens"] for q in srv.requests] == [3000, 4096 - srv.prompts[-1]] and r.parsed


def test_backend_settings_from_yaml_and_flags(tmp_path):
    cfg = tmp_path / "reader.yaml"
    cfg.write_text("backend: vllm\noptions:\n  base_url: http://gpu:8000/v1\n  max_tokens: 900\n  cot: false\n")
    assert backend_settings(cfg) == ("vllm", {"base_url": "http://gpu:8000/v1", "max_tokens": 900, "cot": False})
    assert backend_settings(cfg, max_tokens=700, max_cases=4, model=None) == (
        "vllm", {"base_url": "http://gpu:8000/v1", "max_tokens": 700, "cot": False, "max_cases": 4})
    assert backend_settings(None, "hf", max_tokens=64, model_path="/m")[1] == {"max_new_tokens": 64,
                                                                              "model_path": "/m"}
    with pytest.raises(InputError, match="--max-tokens: the retrieval reader writes no answer"):
        backend_settings(None, "retrieval", max_tokens=10)
    cfg.write_text("backend: vllm\noptions:\n  max_token: 9\n")
    with pytest.raises(BackendError, match=r"unknown option\(s\) max_token for backend 'vllm'"):
        backend_settings(cfg)
    be = get_backend("vllm", base_url="http://127.0.0.1:9/v1", cot=False, max_cases=2)
    assert (be.cot, be.max_cases) == (False, 2)


def test_estimate_counts_digits_one_by_one():
    assert estimate_tokens("1000, 1001") == 8 + 1 and estimate_tokens("sinus rhythm") == 4
