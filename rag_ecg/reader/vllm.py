"""Reader on a vLLM server (PULSE-7B) through its OpenAI-compatible chat-completions API.

vLLM cannot share this project's environment (it pins its own torch/transformers) and wants a GPU, so it
runs as a separate service (training/serve_pulse.sh, docs/serving.md) and many clients talk to it over
HTTP; continuous batching on the server makes concurrent requests (up to `max_concurrency`) cheap. Transient
failures (connection errors, timeouts, 5xx, 429) are retried with exponential backoff; a 4xx is a bad
request and is reported at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from rag_ecg.errors import BackendError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.messages import to_openai_messages
from rag_ecg.redact import mask_url


@dataclass
class VLLMConfig:
    """Settings of the vLLM (OpenAI-compatible) client."""

    base_url: str = "http://127.0.0.1:8000/v1"  # the server's OpenAI API root (ends in /v1)
    model: str | None = None  # served model name; None = the first one the server lists
    api_key: str = "EMPTY"  # vLLM accepts any key unless started with --api-key
    timeout_s: float = 120.0  # per request, connect + read
    max_retries: int = 3  # extra attempts after a transient failure
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_tokens: int = 1024  # answer length cap (CoT text + JSON)
    temperature: float = 0.0  # greedy by default, so a report is reproducible
    max_concurrency: int = 8  # parallel requests a caller may send (batch review fans out up to it)


_RETRY_STATUS = {408, 429}  # timeouts and "slow down" are transient even though they are 4xx


class VLLMBackend(LLMBackend):
    """OpenAI client against a vLLM server; images go as base64 `data:image/png` URL parts."""

    name = "vllm"

    def __init__(self, base_url: str = VLLMConfig.base_url, model: str | None = None, api_key: str = "EMPTY",
                 timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_tokens: int = 1024, temperature: float = 0.0, max_concurrency: int = 8):
        try:
            import openai
        except ImportError:
            raise BackendError("the vllm backend needs the openai client: pip install 'openai>=1.60'") from None
        self.config = VLLMConfig(base_url.rstrip("/"), model, api_key, timeout_s, max_retries, backoff_s,
                                 max_tokens, temperature, max_concurrency)
        self.max_concurrency = max_concurrency
        self._openai = openai
        # retries are ours (to tell 4xx from 5xx and to give one clear error), so the client's are off
        self.client = openai.OpenAI(base_url=self.config.base_url, api_key=api_key, timeout=timeout_s,
                                    max_retries=0)
        self._model = model
        self.shown_url = mask_url(self.config.base_url)  # what messages name: the password hidden

    @property
    def model(self) -> str:  # type: ignore[override]
        if self._model is None:
            self._model = self._call(lambda: self.client.models.list().data[0].id, "list models")
        return self._model

    def _call(self, fn, what: str):
        oa, cfg = self._openai, self.config
        for attempt in range(cfg.max_retries + 1):
            try:
                return fn()
            except oa.APITimeoutError:
                cause = f"timed out after {cfg.timeout_s:g} s"
            except oa.APIConnectionError as exc:
                cause = f"unreachable ({_root_cause(exc)})"
            except oa.APIStatusError as exc:
                detail = _status_detail(exc)
                if exc.status_code < 500 and exc.status_code not in _RETRY_STATUS:
                    raise BackendError(f"vLLM server at {self.shown_url} rejected the request to {what} "
                                       f"(HTTP {exc.status_code}: {detail})") from None
                cause = f"HTTP {exc.status_code}: {detail}"
            except IndexError:
                raise BackendError(f"vLLM server at {self.shown_url} serves no model") from None
            if attempt < cfg.max_retries:
                time.sleep(cfg.backoff_s * (2 ** attempt))
        raise BackendError(f"vLLM server at {self.shown_url}: {what} failed after {cfg.max_retries + 1} "
                           f"attempt(s): {cause}. Is it running? (training/serve_pulse.sh)")

    def generate(self, messages: Sequence[Any], images: Sequence = ()) -> str:
        payload = to_openai_messages(messages, images)
        model = self.model
        resp = self._call(lambda: self.client.chat.completions.create(
            model=model, messages=payload, max_tokens=self.config.max_tokens,
            temperature=self.config.temperature), "generate")
        if not resp.choices:
            raise BackendError(f"vLLM server at {self.shown_url} returned no choices")
        return resp.choices[0].message.content or ""

    def close(self) -> None:
        self.client.close()


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__


def _status_detail(exc) -> str:
    body = getattr(exc, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
    return str(msg or getattr(exc, "message", "") or type(exc).__name__)[:200]
