"""The one interface every reader backend implements, and message plumbing they share.

A backend turns chat messages plus images into answer text (`generate`). Messages are LangChain messages
or OpenAI-style dicts; an image is either a `{"type": "image"}` part filled from `images` in order, or an
OpenAI `image_url` part holding a base64 `data:` URL. Backends that need no text generation (the
retrieval reader) set `composes_reports` and build the Report from the evidence directly.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

from rag_ecg.errors import BackendError

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.search.evidence import Evidence
    from rag_ecg.reader.report import Report

Request = tuple[Sequence[Any], Sequence["Image.Image"]]  # (messages, images) for one generation


class LLMBackend(ABC):
    """Messages + images -> answer text."""

    name: str = ""
    model: str = ""
    composes_reports: bool = False  # True: build reports with `compose(evidence)`, no text generation
    max_concurrency: int = 1  # how many generations may usefully run at once

    @abstractmethod
    def generate(self, messages: Sequence[Any], images: Sequence["Image.Image"] = ()) -> str:
        """The assistant's answer to the conversation."""

    def compose(self, evidence: "Evidence") -> "Report":
        raise BackendError(f"backend {self.name!r} generates text; use interpret() to build a report")

    def generate_many(self, requests: Sequence[Request], max_concurrency: int | None = None,
                      return_exceptions: bool = False) -> list:
        """Answers in request order; with `return_exceptions` a failed request yields its BackendError."""
        workers = max(1, min(max_concurrency or self.max_concurrency, len(requests) or 1))

        def one(req: Request):
            try:
                return self.generate(req[0], req[1])
            except BackendError as exc:
                if return_exceptions:
                    return exc
                raise

        if workers == 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.name}-gen") as pool:
            return list(pool.map(one, requests))

    def close(self) -> None:  # noqa: B027 - a no-op default; backends holding resources override it
        """Release clients or model memory; the backend must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(.*)$", re.S)


def decode_data_url(url: str) -> "Image.Image":
    """A base64 `data:image/...` URL -> PIL image (RGB); other URLs are refused (no network here)."""
    from PIL import Image as PILImage

    m = _DATA_URL.match(url or "")
    if not m:
        raise ValueError(f"image_url {url[:40]!r}...: only base64 data:image URLs are accepted")
    try:
        return PILImage.open(io.BytesIO(base64.b64decode(m.group(1), validate=True))).convert("RGB")
    except (binascii.Error, OSError) as exc:
        raise ValueError(f"image_url: not a decodable base64 image ({exc})") from None


def chat_messages(messages: Sequence[Any], images: Sequence["Image.Image"] = ()) -> tuple[list[dict], list]:
    """Normalise to `[{"role", "content": [text/image parts]}]` + the images in the order they appear."""
    given = list(images)
    out_imgs: list = []
    used = 0
    conv = []
    for m in messages:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.type, m.content)
        if role not in _ROLES:
            raise ValueError(f"message role {role!r}: expected system, user/human or assistant/ai")
        parts: list[dict] = []
        for p in ([content] if isinstance(content, str) else content or []):
            if isinstance(p, str):
                parts.append({"type": "text", "text": p})
            elif p.get("type") == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            elif p.get("type") == "image":
                if used >= len(given):
                    raise ValueError(f"the messages hold more image parts than the {len(given)} image(s) given")
                out_imgs.append(given[used])
                used += 1
                parts.append({"type": "image"})
            elif p.get("type") == "image_url":
                url = p["image_url"]["url"] if isinstance(p.get("image_url"), dict) else p.get("image_url")
                out_imgs.append(decode_data_url(url))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported message part type {p.get('type')!r}")
        conv.append({"role": _ROLES[role], "content": parts})
    if used != len(given):
        raise ValueError(f"{len(given)} image(s) given but the messages hold {used} image placeholder(s)")
    return conv, out_imgs
