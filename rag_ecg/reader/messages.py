"""Chat messages as every backend needs them: LangChain or OpenAI-style in, normalised parts + images out.

An image is either a `{"type": "image"}` part filled from the `images` list in order (its pixels travel
beside the messages), or an OpenAI `image_url` part holding a base64 `data:` URL. `chat_messages` gives the
normalised form a chat template wants (hf backend); `to_openai_messages` the one an OpenAI-compatible server
such as vLLM accepts.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any, Sequence

from PIL import Image

from rag_ecg.data.images import decode_image

IMAGE_PART = {"type": "image"}  # where an image goes in a message's content; its pixels come in `images`

_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(.*)$", re.S)


def image_data_url(image: Image.Image) -> str:
    """PNG bytes of the image as a base64 `data:` URL (the form vLLM's OpenAI API accepts)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_url(url: str) -> Image.Image:
    """A base64 `data:image/...` URL -> PIL image (RGB); other URLs are refused (no network here)."""
    m = _DATA_URL.match(url or "")
    if not m:
        raise ValueError(f"image_url {url[:40]!r}...: only base64 data:image URLs are accepted")
    try:
        data = base64.b64decode(m.group(1), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"image_url: not a decodable base64 image ({exc})") from None
    return decode_image(data, "image_url")  # ImageLoadError (a ValueError): allowed formats only


def chat_messages(messages: Sequence[Any], images: Sequence[Image.Image] = ()) -> tuple[list[dict], list]:
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


def to_openai_messages(messages: Sequence[Any], images: Sequence[Image.Image] = ()) -> list[dict]:
    """OpenAI chat-completions messages; each image part becomes an `image_url` base64 data-URL part."""
    conv, imgs = chat_messages(messages, images)
    it = iter(imgs)
    out = []
    for m in conv:
        parts = [{"type": "image_url", "image_url": {"url": image_data_url(next(it))}} if p["type"] == "image"
                 else p for p in m["content"]]
        if all(p["type"] == "text" for p in parts):  # plain strings suit every server's chat template
            out.append({"role": m["role"], "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    return out
