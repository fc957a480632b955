"""The in-process transformers backend on the tiny LLaVA-NeXT: loads, sees the evidence, generates."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from dataclasses import replace  # noqa: E402

from PIL import Image  # noqa: E402

from rag_ecg.errors import BackendError  # noqa: E402
from rag_ecg.reader.backends import get_backend  # noqa: E402
from rag_ecg.reader.interpret import interpret  # noqa: E402
from rag_ecg.reader.prompts import SYSTEM_PROMPT, build_messages, format_evidence  # noqa: E402
from rag_ecg.reader.report_render import render_text  # noqa: E402
from tests.openai_server import ptbxl_evidence, tiny_llava_dir  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    be = get_backend("hf", model_path=str(tiny_llava_dir()), device="cpu", max_new_tokens=12)
    yield be
    be.close()


@pytest.fixture(scope="module")
def evidence(ptbxl_dir):
    return ptbxl_evidence(ptbxl_dir, ("103", "24", "195"))


def page() -> Image.Image:
    img = Image.new("RGB", (220, 120), (255, 240, 240))
    for x in range(0, 220, 11):
        img.paste((240, 160, 160), (x, 0, x + 1, 120))
    return img


def test_prompt_holds_system_image_and_evidence(backend, evidence):
    prompt, imgs = backend.prompt_text(build_messages(evidence, page()), [page()])
    assert prompt.startswith(SYSTEM_PROMPT + " USER: <image>\n")
    assert prompt.count("<image>") == 1 and len(imgs) == 1
    assert format_evidence(evidence) in prompt and prompt.endswith("ASSISTANT:")


def test_generates_greedily_and_deterministically(backend, evidence):
    msgs = build_messages(evidence, page())
    a = backend.generate(msgs, [page()])
    b = backend.generate(msgs, [page()])
    assert isinstance(a, str) and a == b
    ids = backend.processor.tokenizer(a, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 12 + 2  # max_new_tokens caps the answer (decode/re-encode may merge or split a token)


def test_interpret_keeps_nonsense_as_unparsed_after_one_retry(backend, evidence):
    r = interpret(page(), evidence, backend, retries=1)
    assert r.backend == "hf" and r.model == "tiny-llava"
    assert not r.parsed and r.parse_error and r.raw_text is not None  # a random model writes no JSON
    assert r.retrieval.cases[0].case_id == 1000 and r.retrieval.k == 3
    assert "could not be parsed" in render_text(r)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="not a Hugging Face model folder"):
        get_backend("hf", model_path=str(tmp_path / "PULSE-7B"))


def test_the_prompt_is_fitted_into_the_models_window(evidence):
    """The model's window (max_position_embeddings, or `window_tokens`) holds the prompt and the answer: the
    lowest-ranked cases are dropped to leave `min_answer_tokens`, the report says so and cites only those shown."""
    full = get_backend("hf", model_path=str(tiny_llava_dir()), device="cpu", max_new_tokens=8)
    assert full.window == 4096  # the tiny model's text config
    tokens, how = full.count(build_messages(evidence, page()), [page()])
    assert how == "counted by the model's processor" and tokens > 100
    one_case = full.count(build_messages(replace(evidence, neighbours=evidence.neighbours[:1]), page()), [page()])[0]
    full.close()
    be = get_backend("hf", model_path=str(tiny_llava_dir()), device="cpu", max_new_tokens=8,
                     window_tokens=one_case + 8, min_answer_tokens=8)
    fitted = be.prepare(evidence, page(), cot=True)
    assert [n.case_id for n in fitted.evidence.neighbours] == [1000] and fitted.prompt_tokens == one_case
    assert "evidence cut to 1 of 3 case(s)" in fitted.notes[0] and "case 1001, case 1002" in fitted.notes[0]
    r = interpret(page(), evidence, be, retries=0)
    assert any("evidence cut to 1 of 3" in n for n in r.notes)
    assert set(r.cited_case_ids) <= {1000}
    be.close()
