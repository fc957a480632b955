"""The local web app (`python cli.py serve`): a small Starlette (ASGI) app served by uvicorn.

    app = create_app(Analyzer.open(index_dir, db))   # models loaded once, before the first request

Why Starlette + uvicorn and not Gradio: the pages are the project's own server-rendered HTML (the report section
is `report_render`'s), so the app needs routing, uploads and a queue, nothing more; Starlette, uvicorn and
python-multipart are ~2 MB of pure Python with no frontend bundle, while Gradio brings its own stack and a built
JavaScript frontend whose default theme fetches web fonts. Here nothing is fetched from anywhere but this server.

Work: every analysis runs on ONE worker thread (`WorkQueue`), so the encoder and the reader are loaded once and
never run twice at the same time; requests wait their turn (several users are queued, not crashed), and past
`max_waiting` waiting a request is told in one line to come back (503). Uploads over `max_upload_bytes` are
refused with 413 before they are parsed. Errors are the CLI's one-line errors, on the page or as JSON
(`POST /api/analyze`). Results stay in memory (the last `keep_results`), addressed by unguessable ids.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from rag_ecg.errors import BackendError, InputError, RagEcgError
from rag_ecg.app.analysis import Analyzer, Result
from rag_ecg.app.pages import download_name, error_page, home_page, result_page
from rag_ecg.app.uploads import Example, UploadedFile, list_examples, pick_example, save_upload

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 25
DOWNLOADS = ("report.json", "report.html", "record.zip", "overlay.png")
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
USER_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class BusyError(RagEcgError):
    """Too many analyses are waiting already; the user is told to come back (HTTP 503)."""


class WorkQueue:
    """One worker thread, in arrival order; at most `max_waiting` requests waiting or running."""

    def __init__(self, max_waiting: int = 8):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-ecg-app")
        self.max_waiting = max_waiting
        self.waiting = 0  # changed on the event loop only: no lock needed

    async def run(self, fn, *args):
        if self.waiting >= self.max_waiting:
            raise BusyError(f"busy: {self.waiting} analyses are queued already; try again in a minute")
        self.waiting += 1
        try:
            return await asyncio.wrap_future(self.executor.submit(fn, *args))
        finally:
            self.waiting -= 1

    def call(self, fn, *args):
        """Run `fn` on the worker thread and wait for it (start-up and shutdown: the models live there)."""
        return self.executor.submit(fn, *args).result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class AppState:
    analyzer: Analyzer
    queue: WorkQueue
    examples: list[Example]
    max_upload_bytes: int
    keep_results: int
    info: dict
    results: OrderedDict = field(default_factory=OrderedDict)

    def keep(self, result: Result) -> None:
        self.results[result.id] = result
        while len(self.results) > self.keep_results:
            self.results.popitem(last=False)


def status_of(exc: BaseException) -> int:
    """The HTTP status of a one-line error: the user's input 400, busy 503, a reader service 502, else 500."""
    if isinstance(exc, (InputError, *USER_FILE_ERRORS)):
        return 400
    if isinstance(exc, BusyError):
        return 503
    if isinstance(exc, BackendError):
        return 502
    return 500


def one_line(exc: BaseException) -> str:
    """The error as the CLI prints it (after its `error: `)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def create_app(analyzer: Analyzer, max_upload_mb: float = MAX_UPLOAD_MB, max_waiting: int = 8,
               keep_results: int = 20, examples: list[Example] | None = None,
               queue: WorkQueue | None = None) -> Starlette:
    """The ASGI app over an opened `Analyzer` (whose models the queue's worker thread will use)."""
    state = AppState(analyzer=analyzer, queue=queue or WorkQueue(max_waiting),
                     examples=list_examples() if examples is None else examples,
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024), keep_results=keep_results,
                     info=analyzer.describe())
    limit_line = f"upload too large (limit {max_upload_mb:g} MB): upload one ECG picture, PDF or WFDB record"

    def html(body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(body, status, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    def failure(request: Request, line: str, status: int) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": line}, status)
        if request.url.path == "/analyze":
            return html(home_page(state.info, state.examples, line, max_upload_mb), status)
        return html(error_page(line, state.info), status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        line = limit_line if exc.status_code == 413 else f"{exc.detail or 'HTTP error'} ({request.url.path})"
        return failure(request, line, exc.status_code)

    async def home(request: Request) -> Response:
        return html(home_page(state.info, state.examples, max_upload_mb=max_upload_mb))

    async def run_query(request: Request) -> Result:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.max_upload_bytes:
            raise HTTPException(413)  # said before a byte of it is read
        request = Request(request.scope, _limited(request.receive, state.max_upload_bytes))
        async with request.form(max_files=8, max_fields=8) as form:
            files = [UploadedFile(f.filename or "", await f.read()) for f in form.getlist("file")
                     if hasattr(f, "filename")]
            example = form.get("example")
            patient = patient_fields(form.get("sex"), form.get("age"))
        files = [f for f in files if f.name or f.data]  # an empty file input sends one nameless empty part
        if example and not files:
            ex = pick_example(str(example), state.examples)
            return await state.queue.run(_analyze_example, state.analyzer, ex)
        return await state.queue.run(_analyze_upload, state.analyzer, files, *patient)

    async def attempt(request: Request) -> Result | Response:
        """The query's Result (kept for its page and downloads), or the failure response with its one line."""
        try:
            result = await run_query(request)
        except (RagEcgError, *USER_FILE_ERRORS) as exc:
            return failure(request, one_line(exc), status_of(exc))
        except HTTPException:
            raise
        except Exception as exc:  # a bug on one query: its own line, the app and its worker go on
            log.exception("analysis failed")
            return failure(request, f"internal error ({type(exc).__name__}): {one_line(exc)}", 500)
        state.keep(result)
        return result

    async def analyze_page(request: Request) -> Response:
        result = await attempt(request)
        return RedirectResponse(f"/r/{result.id}", status_code=303) if isinstance(result, Result) else result

    async def analyze_api(request: Request) -> Response:
        result = await attempt(request)
        return JSONResponse(api_result(result)) if isinstance(result, Result) else result

    def result_of(request: Request) -> Result:
        result = state.results.get(request.path_params["rid"])
        if result is None:
            raise HTTPException(404, "no such result (results are kept in memory while the app runs: "
                                     "analyse the ECG again)")
        return result

    async def result_view(request: Request) -> Response:
        return html(result_page(result_of(request), state.info))

    async def download(request: Request) -> Response:
        result, what = result_of(request), request.path_params["what"]
        if what not in DOWNLOADS:
            raise HTTPException(404, "no such download")
        if what == "report.html":  # made on first download, off the event loop
            body, kind = await asyncio.to_thread(result.report_html), "text/html; charset=utf-8"
        else:
            body, kind = {"report.json": (result.report_json, "application/json"),
                          "record.zip": (result.record_zip, "application/zip"),
                          "overlay.png": (result.overlay_png, "image/png")}[what]
        inline = what == "overlay.png" and "download" not in request.query_params  # the page shows it
        return Response(body, media_type=kind, headers={
            "Content-Security-Policy": CSP, "Content-Disposition": "inline" if inline else download_name(result, what)})

    async def case_page(request: Request) -> Response:
        result = result_of(request)
        n = result.neighbour(request.path_params["cid"])
        if n is None or not n.image_path or not Path(n.image_path).is_file():
            raise HTTPException(404, "no page for this case")
        return Response(await asyncio.to_thread(Path(n.image_path).read_bytes), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(state.queue.call, state.analyzer.close)  # on the thread that used it
        state.queue.close()

    routes = [Route("/", home), Route("/analyze", analyze_page, methods=["POST"]),
              Route("/api/analyze", analyze_api, methods=["POST"]), Route("/r/{rid}", result_view),
              Route("/r/{rid}/case/{cid:int}.jpg", case_page), Route("/r/{rid}/{what}", download)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.rag_ecg = state
    return app


def api_result(result: Result) -> dict:
    """`POST /api/analyze`'s answer: the whole result as JSON, pictures and downloads as this server's URLs."""
    base = f"/r/{result.id}"
    return {
        "id": result.id, "name": result.name, "page": base, "seconds": result.seconds, "notes": result.notes,
        "digitized": result.digitized, "measurements": result.measurements,
        "neighbours": [{"case_id": n.case_id, "score": n.score, "similarity_pct": n.similarity_pct,
                        "source": n.source, "external_id": n.external_id, "labels": n.labels,
                        "findings": {c: n.code_descriptions.get(c, c) for c in n.codes}, "report": n.report,
                        "image": f"{base}/case/{n.case_id}.jpg" if n.image_path else None}
                       for n in result.evidence.neighbours],
        "report": result.report.to_dict(), "cited_case_ids": result.report.cited_case_ids,
        "downloads": {k: f"{base}/{k}" for k in DOWNLOADS},
    }


def _limited(receive, limit: int):
    """`receive` that refuses (413) a body growing past `limit` bytes: a chunked upload sends no length."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413)
        return message

    return wrapped


def patient_fields(sex, age) -> tuple[str | None, float | None]:
    """The form's optional sex (M / F / empty) and age (years) -> values, or one line naming the bad field."""
    s = str(sex or "").strip().upper()
    if s not in ("", "M", "F"):
        raise InputError(f"sex {sex!r}: choose M, F or unknown")
    a = str(age or "").strip()
    try:
        years = float(a) if a else None
    except ValueError:
        raise InputError(f"age {a!r} is not a number of years") from None
    if years is not None and not 0 <= years <= 130:
        raise InputError(f"age {a}: not between 0 and 130 years")
    return s or None, years


def _analyze_upload(analyzer: Analyzer, files: list[UploadedFile], sex: str | None = None,
                    age: float | None = None) -> Result:
    with tempfile.TemporaryDirectory(prefix="rag-ecg-app-") as tmp:
        query = save_upload(files, Path(tmp) / "upload")
        return analyzer.analyze(query, query.name, Path(tmp), sex=sex, age=age)


def _analyze_example(analyzer: Analyzer, example: Example) -> Result:
    with tempfile.TemporaryDirectory(prefix="rag-ecg-app-") as tmp:
        return analyzer.analyze(example.path, example.path.name, Path(tmp))


def bind(host: str = "127.0.0.1", port: int = 7860) -> socket.socket:
    """A listening socket, or one line saying why not (a port in use, a host this machine does not have)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program on that "
                         f"port? choose one with --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def server_for(app: Starlette) -> uvicorn.Server:
    """A uvicorn server for `app` (one process; the app's own queue does the scheduling)."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))


def serve(index_dir: str | Path, db: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          backend: str = "retrieval", backend_options: dict | None = None, k: int = 8, cot: bool = True,
          max_cases: int | None = None, max_upload_mb: float = MAX_UPLOAD_MB, max_waiting: int = 8) -> None:
    """Load the models, listen on host:port and serve until interrupted (Ctrl-C)."""
    sock = bind(host, port)  # first: a port in use is said before seconds of model loading
    queue = WorkQueue(max_waiting)
    try:
        analyzer = queue.call(Analyzer.open, index_dir, db, backend, backend_options, k, cot, max_cases)
    except BaseException:
        queue.close()
        sock.close()
        raise
    app = create_app(analyzer, max_upload_mb, max_waiting, queue=queue)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the app (no login)", host)
    where = f"[{host}]" if ":" in host else host
    log.info("rag-ecg web app: http://%s:%d/  (reader %s, index %s; Ctrl-C stops it)", where,
             sock.getsockname()[1], analyzer.backend.name, analyzer.retriever.index_dir)
    with sock:
        server_for(app).run(sockets=[sock])
