"""The in-process transformers backend on the tiny LLaVA-NeXT: loads, sees the evidence, generates."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
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
