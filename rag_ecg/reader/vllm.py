"""Reader on a vLLM server (PULSE-7B) through its OpenAI-compatible chat-completions API.

vLLM cannot share this project's environment (it pins its own torch/transformers) and wants a GPU, so it
runs as a separate service (training/serve_pulse.sh, docs/serving.md). What this client does so that a
request is right the first time:
- the context window comes from the server (`max_model_len` of `GET /v1/models`); the prompt is counted
  (image tokens by LLaVA-NeXT's formula, text by the model's tokenizer, the server's `/tokenize`, or a safe
  estimate) and the lowest-ranked cases are dropped until the answer has room (`token_budget`);
- the answer is constrained to the report's JSON schema (`response_format` json_schema, `report_schema`);
  a server that refuses the schema (HTTP 400) is asked again without it and the lenient parser takes over;
- transient failures (connection errors, timeouts, 408/409/429, 5xx) are retried by the openai client itself
  (`max_retries`, exponential backoff with jitter, honouring `Retry-After`), and a circuit breaker
  (`circuit`) stops sending once the server has plainly stopped answering.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rag_ecg.errors import BackendError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.circuit import CircuitBreaker
from rag_ecg.reader.messages import to_openai_messages
from rag_ecg.reader.report_schema import response_format
from rag_ecg.reader.token_budget import (EstimateCounter, LocalTokenizer, PromptTooLongError, VisionGrid, image_tokens,
                                         text_messages)
from rag_ecg.redact import mask_url

log = logging.getLogger(__name__)


@dataclass
class VLLMConfig:
    """Settings of the vLLM (OpenAI-compatible) client."""

    base_url: str = "http://127.0.0.1:8000/v1"  # the server's OpenAI API root (ends in /v1)
    model: str | None = None  # served model name; None = the first one the server lists
    api_key: str = "EMPTY"  # vLLM accepts any key unless started with --api-key
    timeout_s: float = 120.0  # per attempt, connect + read
    max_retries: int = 2  # the openai client's retries after a transient failure (jitter, Retry-After)
    backoff_s: float = 0.5  # first retry wait when the server names none (Retry-After); doubles each retry
    max_tokens: int = 1024  # answer length cap (CoT text + JSON); lowered to what the window leaves
    min_answer_tokens: int = 400  # cases are dropped until the window leaves at least this for the answer
    temperature: float = 0.0  # greedy by default, so a report is reproducible
    max_concurrency: int = 8  # parallel requests a caller may send (batch review fans out up to it)
    structured: bool = True  # constrain the answer to the report's JSON schema (response_format)
    breaker_failures: int = 3  # consecutive failed calls that open the circuit breaker
    breaker_cooldown_s: float = 30.0  # while open, one trial call is let through this often
    tokenizer: str | None = None  # local model folder (or tokenizer.json) to count text tokens exactly
    max_model_len: int | None = None  # the window when the server does not report one (None: ask it)


_CONTEXT_ERROR = re.compile(r"context length|maximum context|too long|max_tokens|max_completion_tokens", re.I)
_PROMPT_TOKENS = re.compile(r"(\d[\d,]*) (?:tokens )?in the messages|(?:has|request has) (\d[\d,]*) input tokens", re.I)
_WINDOW = re.compile(r"maximum context length is (\d[\d,]*)", re.I)
_CASE_IDS = re.compile(r"Valid case ids to cite: ([\d, ]+)\.")
_REASONING = "Think step by step"  # prompts.COT_INSTRUCTION: the step-by-step prompt asks for this


class _Rejected(BackendError):
    """A 4xx other than 408/409/429: the server answered and refused this request."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status, self.detail = status, detail


def _client_class(openai):
    """The openai client, its retry wait scaled to `backoff_s` unless the server named one (Retry-After)."""

    class Client(openai.OpenAI):
        backoff_scale = 1.0

        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
            wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            asked = self._parse_retry_after_header(response_headers)
            return wait if asked is not None and 0 < asked <= 120 else wait * self.backoff_scale

    return Client


class VLLMBackend(LLMBackend):
    """OpenAI client against a vLLM server; images go as base64 `data:image/png` URL parts."""

    name = "vllm"

    def __init__(self, base_url: str = VLLMConfig.base_url, model: str | None = None, api_key: str = "EMPTY",
                 timeout_s: float = 120.0, max_retries: int = 2, backoff_s: float = 0.5, max_tokens: int = 1024,
                 min_answer_tokens: int = 400, temperature: float = 0.0, max_concurrency: int = 8,
                 structured: bool = True, breaker_failures: int = 3, breaker_cooldown_s: float = 30.0,
                 tokenizer: str | None = None, max_model_len: int | None = None):
        try:
            import openai
        except ImportError:
            raise BackendError("the vllm backend needs the openai client: pip install 'openai>=1.60'") from None
        self.config = VLLMConfig(base_url.rstrip("/"), model, api_key, timeout_s, max_retries, backoff_s, max_tokens,
                                 min_answer_tokens, temperature, max_concurrency, structured, breaker_failures,
                                 breaker_cooldown_s, tokenizer, max_model_len)
        self.max_concurrency = max_concurrency
        self._openai = openai
        self.client = _client_class(openai)(base_url=self.config.base_url, api_key=api_key, timeout=timeout_s,
                                            max_retries=max_retries)
        self.client.backoff_scale = backoff_s / 0.5  # openai's first wait is 0.5 s
        self.shown_url = mask_url(self.config.base_url)  # what messages name: the password hidden
        self.breaker = CircuitBreaker(breaker_failures, f"vLLM server at {self.shown_url}", self._probe,
                                      breaker_cooldown_s)
        self._model = model
        self._window: int | None = max_model_len
        self._listed = False
        self._structured = structured
        self._lock = threading.Lock()
        self._local = LocalTokenizer(tokenizer) if tokenizer else None
        self.vision = (VisionGrid.from_model_dir(tokenizer) if tokenizer and (Path(tokenizer) / "config.json").is_file()
                       else VisionGrid())
        self._server_tokenize: bool | None = None  # None: not tried yet

    # ------------------------------------------------------------------ the server's model and window
    def _list(self) -> None:
        with self._lock:
            if self._listed:
                return
            cards = self._call(lambda: self.client.models.list().data, "list models")
            if not cards:
                raise BackendError(f"vLLM server at {self.shown_url} serves no model")
            card = next((c for c in cards if c.id == self._model), cards[0])
            self._model = self._model or card.id
            if self._window is None:
                reported = (card.model_extra or {}).get("max_model_len") if hasattr(card, "model_extra") else None
                self._window = int(reported) if reported else None
            self._listed = True

    @property
    def model(self) -> str:  # type: ignore[override]
        if self._model is None:
            self._list()
        return self._model

    @property
    def window(self) -> int | None:
        """The model's context window in tokens (None: the server does not say and none was configured)."""
        if not self._listed and self._window is None:
            self._list()
        return self._window

    # ------------------------------------------------------------------ counting
    def _tokenize_url(self) -> str:
        return re.sub(r"/v1$", "", self.config.base_url) + "/tokenize"

    def _count_text(self, messages: list[dict]) -> tuple[int, str]:
        if self._local is not None:
            return self._local.count(messages), "counted with the model's tokenizer"
        if self._server_tokenize is not False and not self.breaker.is_open:  # no /tokenize to a dead server
            try:
                out = self.client.with_options(max_retries=0, timeout=min(10.0, self.config.timeout_s)).post(
                    self._tokenize_url(), cast_to=object,
                    body={"model": self.model, "messages": messages, "add_generation_prompt": True})
                self._server_tokenize = True
                return int(out["count"]), "counted by the server"
            except (self._openai.APIError, KeyError, TypeError, ValueError) as exc:
                if self._server_tokenize is None:
                    log.debug("%s: no usable /tokenize (%s); prompt tokens are estimated", self.shown_url,
                             type(exc).__name__)
                self._server_tokenize = False
        return EstimateCounter().count(messages), "estimated"

    def count(self, messages: Sequence[Any], images: Sequence = ()) -> tuple[int, str]:
        """Prompt tokens of a conversation (text + each picture's LLaVA-NeXT tokens) and how they were counted."""
        texts, imgs = text_messages(messages, images)
        n, how = self._count_text(texts)
        return n + sum(image_tokens(*im.size, self.vision) for im in imgs), how

    @property
    def min_answer(self) -> int:
        """Tokens the window must leave for the answer (`prepare` drops cases until it does)."""
        return min(self.config.min_answer_tokens, self.config.max_tokens)

    # ------------------------------------------------------------------ calls
    def _probe(self) -> bool:
        """Does the server still answer a cheap request (its model list, 5 s, no retries)?"""
        try:
            self.client.with_options(max_retries=0, timeout=min(5.0, self.config.timeout_s)).models.list()
            return True
        except self._openai.APIError:
            return False

    def _call(self, fn, what: str):
        oa, cfg = self._openai, self.config
        self.breaker.check()
        try:
            out = fn()
        except oa.APITimeoutError:
            cause = f"timed out after {cfg.timeout_s:g} s"
        except oa.APIConnectionError as exc:
            cause = f"unreachable ({_root_cause(exc)})"
        except oa.APIStatusError as exc:
            detail = _status_detail(exc)
            if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                self.breaker.success()  # it answered: up, just refusing this request
                raise _Rejected(f"vLLM server at {self.shown_url} rejected the request to {what} "
                                f"(HTTP {exc.status_code}: {detail})", exc.status_code, detail) from None
            cause = f"HTTP {exc.status_code}: {detail}"
        else:
            self.breaker.success()
            return out
        self.breaker.failure(cause)
        raise BackendError(f"vLLM server at {self.shown_url}: {what} failed after {cfg.max_retries + 1} "
                           f"attempt(s): {cause}. Is it running? (training/serve_pulse.sh)")

    def _request(self, payload: list[dict], max_tokens: int, fmt: dict | None):
        extra = {"response_format": fmt} if fmt is not None else {}
        return self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=payload, max_tokens=max_tokens, temperature=self.config.temperature,
            **extra), "generate")

    def generate(self, messages: Sequence[Any], images: Sequence = ()) -> str:
        payload = to_openai_messages(messages, images)
        max_tokens, window = self.config.max_tokens, self.window
        if window is not None:
            prompt, how = self.count(messages, images)
            if window - prompt < 16:
                raise PromptTooLongError(f"the prompt takes {prompt:,} tokens ({how}) of the model's {window:,}-token "
                                         "window: no room for an answer")
            max_tokens = min(max_tokens, window - prompt)
        fmt = None
        if self._structured:
            text = "\n".join(m["content"] for m in text_messages(messages, images)[0])
            ids = _CASE_IDS.search(text)
            fmt = response_format([int(x) for x in ids.group(1).split(",")] if ids else [], _REASONING in text)
        try:
            resp = self._request(payload, max_tokens, fmt)
        except _Rejected as exc:
            resp = self._after_rejection(exc, payload, max_tokens, fmt, window)
        if not resp.choices:
            raise BackendError(f"vLLM server at {self.shown_url} returned no choices")
        return resp.choices[0].message.content or ""

    def _after_rejection(self, exc: _Rejected, payload, max_tokens: int, fmt, window: int | None):
        """A 400 about the length: once more with the room the server says is left; about the schema: once more
        unconstrained (and no schema from now on if that works). Anything else stands."""
        if exc.status == 400 and _CONTEXT_ERROR.search(exc.detail):
            m, w = _PROMPT_TOKENS.search(exc.detail), _WINDOW.search(exc.detail)
            used = int((m.group(1) or m.group(2)).replace(",", "")) if m else None
            window = int(w.group(1).replace(",", "")) if w else window  # the server's word over ours
            if window is None or used is None or window - used < 16:
                raise PromptTooLongError(f"vLLM server at {self.shown_url}: the prompt does not fit the model's "
                                         f"window ({exc.detail})") from None
            log.warning("%s counts %d prompt tokens, more than counted here: answer capped at %d tokens",
                        self.shown_url, used, window - used)
            return self._request(payload, min(max_tokens, window - used), fmt)
        if exc.status == 400 and fmt is not None:
            resp = self._request(payload, max_tokens, None)
            log.warning("%s refused the report's JSON schema (%s): answers are no longer constrained and are read "
                        "by the lenient parser", self.shown_url, exc.detail)
            self._structured = False
            return resp
        raise exc

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
    return str(msg or getattr(exc, "message", "") or type(exc).__name__)[:300]
