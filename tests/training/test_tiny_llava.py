"""The tiny offline LLaVA-NeXT: loads back with from_pretrained exactly and generates from (image, chat)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")
from PIL import Image  # noqa: E402

from training.tiny_llava import GRID_PINPOINTS, build_model, build_processor, build_tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "tiny-llava", seed=3)


def _inputs(processor, size=(240, 100)):
    """A wide page-like image (as ECG prints are) and a one-turn chat."""
    img = Image.new("RGB", size, (255, 235, 235))
    for x in range(0, size[0], 10):  # a grid, so the pixels are not constant
        for y in range(size[1]):
            img.putpixel((x, y), (230, 120, 120))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the rhythm?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return text, processor(images=img, text=text, return_tensors="pt")


def test_round_trip_identical_logits_and_generation(tiny_dir):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(tiny_dir)
    loaded = LlavaNextForConditionalGeneration.from_pretrained(tiny_dir).eval()
    fresh = build_model(build_processor().tokenizer, seed=3)  # same seed, same tokenizer -> same weights

    text, inputs = _inputs(processor)
    assert text.startswith("A chat between") and "USER: <image>\nWhat is the rhythm? ASSISTANT:" in text
    n_img = int((inputs["input_ids"] == processor.tokenizer.image_token_id).sum())
    assert n_img > 16  # base 4x4 patches + any-resolution grid features were expanded into the prompt
    assert inputs["pixel_values"].shape[-2:] == (56, 56)
    assert processor.image_processor.image_grid_pinpoints == GRID_PINPOINTS
    with torch.no_grad():
        a = loaded(**inputs).logits
        b = fresh(**inputs).logits
    assert a.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.equal(a, b)

    with torch.no_grad():
        out = loaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= new.numel() <= 6
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_tokenizer_specials_and_chat_turns(tiny_dir):
    from transformers import LlavaNextProcessor

    tok = LlavaNextProcessor.from_pretrained(tiny_dir).tokenizer
    assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == tok.image_token_id
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    ids = tok("sinus rhythm <image> ok")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.image_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "sinus rhythm  ok"

    proc = build_processor(tok)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "75 bpm"}]},
            {"role": "user", "content": "Rhythm?"}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "Be brief. USER: <image>\nRate? ASSISTANT: 75 bpm</s>USER: Rhythm? ASSISTANT:"
