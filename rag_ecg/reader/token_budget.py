"""Fitting a reader prompt into the model's context window: image tokens, text tokens, evidence, answer room.

PULSE-7B is served with a 4,096-token window and one ECG page alone takes ~2,440 of them, so a prompt built
without counting is at or over the window and vLLM refuses it (HTTP 400). Here the window comes from the
server (`max_model_len` of `GET /v1/models`), the image is counted with LLaVA-NeXT's any-resolution formula,
the text with the model's tokenizer (a local `tokenizer.json`, or the server's `POST /tokenize`) or a safe
estimate, and the lowest-ranked cases are dropped until the answer has room; a note says what was cut.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tokenizers import Tokenizer

from rag_ecg.errors import InputError
from rag_ecg.reader.messages import chat_messages
from rag_ecg.reader.prompts import build_messages

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.search.evidence import Evidence

log = logging.getLogger(__name__)


class PromptTooLongError(InputError):
    """Even with no evidence (and no step-by-step instruction) the chart does not fit the model's window."""


# ---------------------------------------------------------------- image tokens (LLaVA-NeXT any-resolution)


@dataclass(frozen=True)
class VisionGrid:
    """The processor settings that decide how many tokens a picture costs (defaults: PULSE-7B / llava-v1.6)."""

    crop: int = 336  # px of one CLIP crop (vision_config.image_size)
    patch: int = 14  # ViT patch size: 336 / 14 = 24 patches a side, 576 tokens a crop
    pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    drop_cls: bool = True  # vision_feature_select_strategy "default": the CLS feature is not an image token

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "VisionGrid":
        """The grid of a local LLaVA-NeXT folder (its config.json), so a non-PULSE model is counted right."""
        cfg_path = Path(path).expanduser() / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
            vc = cfg["vision_config"]
            return cls(crop=int(vc["image_size"]), patch=int(vc["patch_size"]),
                       pinpoints=tuple((int(h), int(w)) for h, w in cfg["image_grid_pinpoints"]),
                       drop_cls=cfg.get("vision_feature_select_strategy", "default") == "default")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{cfg_path}: not a LLaVA-NeXT config ({type(exc).__name__}: {exc})") from None


def best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint grid (height, width) the picture is resized into: most effective pixels, least waste
    (transformers.image_processing_utils.select_best_resolution, same arithmetic)."""
    best, max_eff, min_waste = pinpoints[0], 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (ph, pw), eff, waste
    return best


def _unpadded(height: int, width: int, cur_h: int, cur_w: int, exact_round: bool) -> tuple[int, int]:
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7)) if exact_round else (height * cur_w) // width
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7)) if exact_round else (width * cur_h) // height
        cur_w -= ((cur_w - new_w) // 2) * 2
    return cur_h * cur_w, cur_h


def image_tokens(width: int, height: int, grid: VisionGrid = VisionGrid()) -> int:
    """Placeholder tokens one picture of `width`×`height` px becomes in a LLaVA-NeXT prompt.

    The formula of transformers' `LlavaNextProcessor._get_number_of_features` (+ `_get_unpadded_features`)
    and of vLLM's `LlavaNextForConditionalGeneration` (`_get_num_unpadded_features`): the base crop gives
    (crop/patch)² tokens (576 at 336/14); the picture is fitted into the best pinpoint grid (`best_resolution`),
    whose (grid/crop) tiles give (grid/patch) patch rows and columns; the rows/columns that are only padding
    (aspect ratio) are removed, and every remaining row ends with one `image_newline` token. The CLS feature
    is counted and then dropped for strategy "default". vLLM releases before it matched transformers rounded
    the unpadded size with integer division; both roundings are computed and the larger is returned, so
    the count is never below what either server expands.
    """
    if width < 1 or height < 1:
        raise InputError(f"image of {width}x{height} px: nothing to count")
    side = grid.crop // grid.patch
    gh, gw = best_resolution(height, width, grid.pinpoints)
    cur_h, cur_w = side * (gh // grid.crop), side * (gw // grid.crop)
    tiles = max(sum(_unpadded(height, width, cur_h, cur_w, rnd)) for rnd in (True, False))  # + newlines
    return side * side + (0 if grid.drop_cls else 1) + tiles


# ---------------------------------------------------------------- text tokens


def estimate_tokens(text: str) -> int:
    """A safe over-estimate for Llama-family tokenizers, which split every digit into its own token and
    average ~4 bytes a token on English (fewer on German): digits + non-digit UTF-8 bytes / 3."""
    digits = sum(ch.isdigit() for ch in text)
    return digits + math.ceil((len(text.encode("utf-8")) - digits) / 3)


MESSAGE_OVERHEAD = 8  # role names and separators the chat template adds per message (vicuna: "USER: ", "</s>")


def text_messages(messages: Sequence[Any], images: Sequence["Image.Image"] = ()) -> tuple[list[dict], list]:
    """OpenAI-style messages with text content only (image parts removed; counted apart) + the images."""
    conv, imgs = chat_messages(messages, images)
    out = [{"role": m["role"], "content": "\n".join(p["text"] for p in m["content"] if p["type"] == "text")}
           for m in conv]
    return out, imgs


class LocalTokenizer:
    """The model's own tokenizer from a local folder's `tokenizer.json` (exact text counts, no transformers)."""

    def __init__(self, path: str | Path):
        p = Path(path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise InputError(f"{file}: no tokenizer.json to count prompt tokens with (save the model's fast "
                             "tokenizer there, or leave `tokenizer` unset to use the server's count)")
        self.tok = Tokenizer.from_file(str(file))

    def count(self, messages: list[dict]) -> int:
        return sum(len(self.tok.encode(m["content"], add_special_tokens=False).ids) + MESSAGE_OVERHEAD
                   for m in messages) + MESSAGE_OVERHEAD


class EstimateCounter:
    """No tokenizer at hand: `estimate_tokens` per message plus the template's overhead."""

    def count(self, messages: list[dict]) -> int:
        return sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages) + MESSAGE_OVERHEAD


# ---------------------------------------------------------------- fitting


@dataclass
class FittedPrompt:
    """The messages to send, the evidence they show (citations are checked against it) and notes for the
    report (what was cut to fit, and why)."""

    messages: list
    evidence: "Evidence"
    notes: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None  # counted (None: the window is unknown, nothing was counted)


def plain_prompt(evidence: "Evidence", image, cot: bool, max_cases: int | None, measured: str) -> FittedPrompt:
    """The prompt as asked for, uncounted (backends without a known window)."""
    shown = _first(evidence, max_cases)
    return FittedPrompt(build_messages(shown, image, cot=cot, measured=measured), shown)


def _first(evidence: "Evidence", n: int | None) -> "Evidence":
    return evidence if n is None or n >= len(evidence.neighbours) else replace(
        evidence, neighbours=list(evidence.neighbours)[:max(0, n)])


def fit_prompt(evidence: "Evidence", image, cot: bool, max_cases: int | None, measured: str,
               count: Callable[[list, list], tuple[int, str]], window: int, min_answer: int) -> FittedPrompt:
    """Show as many of the best-ranked cases as leave `min_answer` tokens for the answer in `window`.

    `count(messages, images)` gives the whole prompt's tokens and how they were counted. Cases are dropped from the lowest rank up;
    when even none leaves room, the step-by-step instruction gives way to the JSON-only one; when that does
    not fit either, PromptTooLongError (the chart, not the server, is the problem)."""
    n0 = len(evidence.neighbours) if max_cases is None else min(max_cases, len(evidence.neighbours))
    images = [image] if image is not None else []
    for use_cot in ([cot, False] if cot else [False]):
        for n in range(n0, -1, -1):
            shown = _first(evidence, n)
            msgs = build_messages(shown, image, cot=use_cot, measured=measured)
            tokens, method = count(msgs, images)
            if window - tokens >= min_answer:
                notes = []
                if n < n0:
                    cut = [int(x.case_id) for x in evidence.neighbours[n:n0]]
                    notes.append(f"evidence cut to {n} of {n0} case(s) to fit the model's {window:,}-token window "
                                 f"(prompt {tokens:,} tokens, {method}); not shown: "
                                 + ", ".join(f"case {c}" for c in cut))
                if use_cot != cot:
                    notes.append(f"the step-by-step instruction did not fit the {window:,}-token window: "
                                 "the reader was asked for the JSON report alone")
                for note in notes:
                    log.debug(note)
                return FittedPrompt(msgs, shown, notes, tokens)
    raise PromptTooLongError(f"the chart's prompt needs {tokens:,} tokens ({method}) with no evidence and no "
                             f"step-by-step instruction, leaving fewer than {min_answer} of the model's "
                             f"{window:,}-token window for the answer: send a smaller page or serve a longer window")
