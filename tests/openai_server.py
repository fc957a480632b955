"""Test support: a real OpenAI-compatible HTTP server on 127.0.0.1, evidence from real PTB-XL rows, and
one tiny LLaVA-NeXT folder shared by the tests of a session.

The server speaks `/v1/models` and `/v1/chat/completions` the way vLLM does (including its error body),
answering from a real backend (the tiny LLaVA-NeXT through the hf backend) or from a queue of scripted
answers, with switches that make it slow, fail once, fail always, or reject requests.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from rag_ecg.search.evidence import Evidence, Neighbour
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.records import read_ptbxl_index


class OpenAITestServer:
    """`with OpenAITestServer(backend=...) as srv:` then point a client at `srv.url`."""

    def __init__(self, backend=None, replies: Sequence[str] = (), model_name: str = "tiny-llava"):
        self.backend = backend  # answers chat requests (an LLMBackend), after the scripted replies run out
        self.replies = list(replies)  # scripted answers, served first, in order
        self.model_name = model_name
        self.delay_s = 0.0  # sleep before answering (to trigger client timeouts)
        self.fail_next = 0  # answer this many next requests with HTTP 500
        self.always_status: int | None = None  # answer every chat request with this HTTP status
        self.requests: list[dict] = []  # every chat request body received, in order
        self.max_in_flight = 0  # most chat requests handled at the same moment
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "OpenAITestServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _error(self, status: int, message: str) -> None:
                self._send(status, {"error": {"message": message, "type": "BadRequestError" if status < 500
                                              else "InternalServerError", "param": None, "code": status}})

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "created": 0, "owned_by": "test"}]})
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                    fail = server.fail_next > 0
                    server.fail_next -= int(fail)
                try:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    if server.always_status is not None:
                        return self._error(server.always_status, f"injected HTTP {server.always_status}")
                    if fail:
                        return self._error(500, "injected transient failure")
                    if body.get("model") != server.model_name:
                        return self._error(404, f"The model `{body.get('model')}` does not exist.")
                    with server._lock:  # a scripted reply is used up only by a request that is answered
                        reply = server.replies.pop(0) if server.replies else None
                    if reply is None:
                        if server.backend is None:
                            return self._error(500, "no scripted reply left and no backend")
                        reply = server.backend.generate(body["messages"], [])
                    self._send(200, {
                        "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                        "created": int(time.time()), "model": server.model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
                finally:
                    with server._lock:
                        server._in_flight -= 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="openai-test-server").start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# PTB-XL ecg_ids with real reports: sinus tachycardia + MI/CD, normal ECGs, RBBB, a Swedish STTC report.
EVIDENCE_ECG_IDS = ("103", "24", "195", "43", "134", "149")


def ptbxl_evidence(ptbxl_dir: Path, ecg_ids: Sequence[str] = EVIDENCE_ECG_IDS, first_case_id: int = 1000,
                   votes: bool = True) -> Evidence:
    """Evidence whose neighbours are real PTB-XL rows (reports, codes, English code descriptions, labels).

    Case ids are `first_case_id + rank`; scores fall from 0.93 by 0.04 per rank; when `votes`, the
    superclass/code scores are similarity-weighted shares, as retrieval computes them before calibration.
    """
    rows, statements = read_ptbxl_index(ptbxl_dir)
    by_id = {r.ecg_id: r for r in rows}
    ns = []
    for i, eid in enumerate(ecg_ids):
        r = by_id[eid]
        ns.append(Neighbour(case_id=first_case_id + i, score=round(0.93 - 0.04 * i, 3), source="ptbxl",
                            external_id=r.ecg_id, report=r.report, codes=dict(r.codes),
                            code_descriptions={c: statements[c].description for c in r.codes if c in statements},
                            labels=list(r.labels), age=r.age, sex=r.sex, patient_id=r.patient_id))
    ev = Evidence(neighbours=ns, k=len(ns), index_name="test-index", encoder_hash="0123abcd")
    if votes:
        total = sum(n.score for n in ns)
        ev.superclass_scores = {s: round(sum(n.score for n in ns if s in n.labels) / total, 4) for s in SUPERCLASSES}
        codes = sorted({c for n in ns for c in n.codes})
        ev.code_scores = {c: round(sum(n.score for n in ns if c in n.codes) / total, 4) for c in codes}
    return ev


@functools.lru_cache(maxsize=1)
def tiny_llava_dir() -> Path:
    """The tiny random-init LLaVA-NeXT (training/tiny_llava.py), built once per test session; read-only."""
    from training.tiny_llava import build_tiny_llava

    root = Path(tempfile.mkdtemp(prefix="rag-ecg-tiny-llava-"))
    atexit.register(shutil.rmtree, root, True)
    return build_tiny_llava(root / "tiny-llava", seed=0)
