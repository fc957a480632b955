"""Test support: a fake vLLM server on 127.0.0.1 that behaves like vLLM where the client depends on it.

- `GET /v1/models` lists the model with its `max_model_len`, as vLLM's model cards do;
- `POST /v1/chat/completions` counts the prompt and answers HTTP 400 with vLLM's own wording when prompt +
  `max_tokens` exceed the window. Text is counted crudely but deterministically (`text_tokens`); each image
  by transformers' own `LlavaNextProcessor._get_number_of_features` with PULSE-7B's processor settings, so
  the client's formula is checked against an independent implementation;
- `response_format` json_schema: the "model" then writes an instance of the schema it was sent (first enum
  value, midpoint of numeric bounds) — valid by construction, as vLLM's constrained decoding makes it — or,
  with `structured=False`, the server refuses the schema with a 400;
- `POST /tokenize` (switch `tokenize`) returns the same count vLLM's endpoint would;
- switches to hang (`hang_s`, optionally the model list too), to fail with 5xx + `Retry-After`, and a queue of
  scripted free-text replies (malformed JSON and the like) used when no schema is sent.
"""
from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Sequence

from PIL import Image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

PULSE_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def hf_image_tokens(width: int, height: int) -> int:
    """Image tokens as transformers' LlavaNextProcessor expands them (PULSE-7B: 336-px crops, patch 14)."""
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PULSE_PINPOINTS), patch_size=14,
                           num_additional_image_tokens=1)
    proc._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, 336, 336) - 1  # "default": no CLS


def text_tokens(text: str) -> int:
    """The fake tokenizer: one token per 4 UTF-8 bytes, rounded up (crude, deterministic)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def prompt_tokens(messages: list[dict]) -> int:
    n = 0
    for m in messages:
        parts = [m["content"]] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            if isinstance(p, str) or p.get("type") == "text":
                n += text_tokens(p if isinstance(p, str) else p["text"])
            else:
                data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                n += hf_image_tokens(*Image.open(io.BytesIO(data)).size)
        n += 3  # role and separators
    return n


def schema_instance(schema: dict, node: dict | None = None) -> object:
    """A value that satisfies `node` of a JSON schema (the subset pydantic writes): what a constrained model
    would be forced into. Strings are short ECG words, numbers the middle of their bounds, arrays one item."""
    node = schema if node is None else node
    if "$ref" in node:
        return schema_instance(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in node:
        return schema_instance(schema, next(o for o in node["anyOf"] if o.get("type") != "null"))
    if "enum" in node:
        return node["enum"][0]
    kind = node.get("type")
    if kind == "object":
        return {k: schema_instance(schema, node["properties"][k]) for k in node["properties"]}
    if kind == "array":
        return [] if node.get("maxItems") == 0 else [schema_instance(schema, node["items"])]
    if kind in ("number", "integer"):
        lo, hi = node.get("minimum", 0), node.get("maximum", 1)
        return (lo + hi) / 2 if kind == "number" else int(lo)
    if kind == "string":
        return "constrained answer"
    raise ValueError(f"schema node not handled: {node}")


class FakeVLLM:
    """`with FakeVLLM(max_model_len=4096) as srv:` then point the vllm backend at `srv.url`."""

    def __init__(self, max_model_len: int | None = 4096, replies: Sequence[str] = (), model_name: str = "pulse-7b",
                 structured: bool = True, tokenize: bool = False):
        self.max_model_len = max_model_len  # None: the model card has no max_model_len (not every server says)
        self.replies = list(replies)  # free-text answers for requests without a schema, in order
        self.model_name = model_name
        self.structured = structured  # False: answer a response_format json_schema with HTTP 400
        self.tokenize = tokenize  # serve POST /tokenize
        self.hang_s = 0.0  # sleep this long before answering a chat request (a hung engine)
        self.hang_models = False  # ...and the model list too (the whole server hung)
        self.fail_next = 0  # answer this many next chat requests with `fail_status`
        self.fail_status = 503
        self.retry_after: str | None = None  # Retry-After header sent with those failures
        self.requests: list[dict] = []  # every chat request body, in order
        self.times: list[float] = []  # monotonic arrival time of each chat request
        self.prompts: list[int] = []  # the prompt tokens this server counted for each chat request
        self.tokenize_calls = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeVLLM":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _error(self, status: int, message: str, headers: dict | None = None) -> None:
                self._send(status, {"object": "error", "message": message, "type": "BadRequestError",
                                    "param": None, "code": status}, headers)

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._error(404, f"no route {self.path}")
                if server.hang_models:
                    time.sleep(server.hang_s)
                card = {"id": server.model_name, "object": "model", "created": 0, "owned_by": "vllm"}
                if server.max_model_len is not None:
                    card["max_model_len"] = server.max_model_len
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                path = self.path.rstrip("/")
                body = self._body()
                if path == "/tokenize" and server.tokenize:
                    with server._lock:
                        server.tokenize_calls += 1
                    return self._send(200, {"count": prompt_tokens(body["messages"]), "tokens": [],
                                            "max_model_len": server.max_model_len})
                if path != "/v1/chat/completions":
                    return self._error(404, f"Not Found: {self.path}")
                with server._lock:
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                    fail = server.fail_next > 0
                    server.fail_next -= int(fail)
                if server.hang_s:
                    time.sleep(server.hang_s)
                if fail:
                    headers = {"Retry-After": server.retry_after} if server.retry_after else {}
                    return self._error(server.fail_status, "injected: engine busy", headers)
                n = prompt_tokens(body["messages"])
                with server._lock:
                    server.prompts.append(n)
                max_tokens = int(body.get("max_tokens") or 16)
                if server.max_model_len is not None and n + max_tokens > server.max_model_len:
                    return self._error(400, f"This model's maximum context length is {server.max_model_len} "
                                            f"tokens. However, you requested {n + max_tokens} tokens ({n} in the "
                                            f"messages, {max_tokens} in the completion). Please reduce the "
                                            "length of the messages or completion.")
                fmt = body.get("response_format")
                if fmt is not None and fmt.get("type") == "json_schema":
                    if not server.structured:
                        return self._error(400, "response_format json_schema is not supported by this server")
                    reply = json.dumps(schema_instance(fmt["json_schema"]["schema"]))
                else:
                    with server._lock:
                        reply = server.replies.pop(0) if server.replies else "I cannot read this ECG."
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": server.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": text_tokens(reply),
                              "total_tokens": n + text_tokens(reply)}})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="fake-vllm").start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
