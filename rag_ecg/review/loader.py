"""Chart loading: open or draw each chart, prepare it for the encoder, measure its tracing, make its thumbnail,
in worker processes.

Measurements: a picture is read by the digitiser once, and that read serves the not-an-ECG check, the trace
encoder's input and the measurements; a WFDB record or store case is measured from its own signal (the drawn
page is only for the encoder). A failed measurement is that chart's `measurements["error"]`, never its error.

Why processes: decoding and drawing pages is CPU work that would otherwise stall the encoder; a bad or
crashing chart must never stop the batch, so every failure becomes that chart's one-line error.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from rag_ecg.data.images import load_image, split_page
from rag_ecg.data.records import ECGRecord, read_wfdb
from rag_ecg.data.store import Case, load_case_record
from rag_ecg.paper.digitize import digitize
from rag_ecg.paper.export import overlay
from rag_ecg.paper.render import render_page
from rag_ecg.reader.tracing import page_measurements, quietly, record_measurements, signal_measurements
from rag_ecg.review.config import FULL_WIDTH, ReviewError


@dataclass
class LoadTask:
    """What a loader process needs for one chart (picklable)."""

    item_id: int
    key: str
    path: str
    kind: str
    meta: dict
    preprocess: Any  # rag_ecg.encoder.model.Preprocess (frozen dataclass)
    preset: str
    dpi: int
    thumb_width: int
    image_max_side: int  # 0: the backend needs no image


@dataclass
class Loaded:
    """A loaded chart, or why it could not be loaded."""

    item_id: int
    key: str
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 letterboxed page for the encoder
    thumb: bytes | None = None  # small JPEG of the chart for the HTML page
    full: bytes | None = None  # the chart FULL_WIDTH px wide: what the page opens on a click
    overlay: bytes | None = None  # a digitised picture with its read traces drawn over it (FULL_WIDTH px)
    image: Any = None  # PIL page for text backends (longest side <= image_max_side), else None
    patient_id: str | None = None  # query's own patient (store charts): excluded from its neighbours
    error: str | None = None  # one line naming the chart and the problem
    measurements: dict | None = None  # the tracing's (reader.tracing): all None + "error" when not measurable
    load_s: float = 0.0
    open_s: float | None = None  # seconds to decode/draw the page; None: it never opened (a bad file)


def one_line(key: str, exc: BaseException) -> str:
    """An exception as one line that names the chart."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = Path(key).name
    if name not in text and key not in text:
        text = f"{key}: {text}"
    return text if len(text) <= 300 else text[:299] + "…"


def open_chart(kind: str, path: str, meta: dict, preset: str = "clean", dpi: int = 100,
               key: str | None = None) -> Image.Image:
    """A chart as a PIL RGB page: image files are read (`x.pdf#page=N`: that page), WFDB records and store cases
    are drawn."""
    if kind == "image":
        file, page = split_page(path)
        return load_image(file, page=page)
    return draw_record(chart_record(kind, path, meta, key), preset, dpi, key or path)


def chart_record(kind: str, path: str, meta: dict, key: str | None = None) -> ECGRecord:
    """The signal of a WFDB or store chart (a store case with its age and sex from the store)."""
    if kind == "wfdb":
        return read_wfdb(path, record_id=key or Path(path).name)
    if kind == "case":
        case = Case(source=meta.get("source") or "wfdb", external_id=meta.get("external_id") or "",
                    signal_path=path, patient_id=meta.get("patient_id"), age=meta.get("age"), sex=meta.get("sex"))
        return load_case_record(case)
    raise ValueError(f"{path}: unknown chart kind {kind!r}")


def draw_record(rec: ECGRecord, preset: str, dpi: int, key: str) -> Image.Image:
    """The record's page as the encoder sees it (a WFDB or store chart has no picture of its own)."""
    # A seed per chart: a clean page is the same either way, but artifact presets should differ chart to chart.
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) if preset != "clean" else 0
    return render_page(rec, preset=preset, seed=seed, dpi=dpi)


def _prepare(task: LoadTask, page: Image.Image, rec: ECGRecord | None, out: Loaded) -> tuple[Any, dict]:
    """(encoder input, measurements) of an opened chart (a picture's trace overlay into `out`); raises where a
    picture is no ECG."""
    if rec is None:  # a picture
        arr = np.ascontiguousarray(np.asarray(page.convert("RGB")))
        read = digitize(arr)  # the not-an-ECG check either encoder makes; measured from the same read
        try:  # the page shows how the traces were read; a failed drawing costs nothing else
            out.overlay = jpeg_bytes(Image.fromarray(overlay(arr, read)), FULL_WIDTH, 85, optimize=False)
        except Exception:
            out.overlay = None
        if getattr(task.preprocess, "kind", "") == "trace":
            pixels = task.preprocess.stack(read.signal, read.mask)
        else:
            pixels = task.preprocess.pixels(page, strict=False)
        return pixels, quietly(task.key, lambda: page_measurements(arr, read, task.key))
    # a drawn record is an ECG by construction: an image tower need not digitise it to check (the trace tower
    # reads it, and an unreadable drawing stays that chart's error)
    pixels = task.preprocess.pixels(page, strict=getattr(task.preprocess, "kind", "") == "trace")
    if task.kind == "wfdb":  # sex and age from the header's comments, where it has them
        return pixels, quietly(task.key, lambda: record_measurements(task.path, task.key))
    return pixels, quietly(task.key, lambda: signal_measurements(rec, task.key))


def jpeg_bytes(image: Image.Image, width: int, quality: int = 80, optimize: bool = True) -> bytes:
    """A JPEG of a page, `width` px wide (never upscaled); `optimize=False`: ~40 % faster, ~15 % larger (the
    full-size pictures every chart gets)."""
    img = image.convert("RGB")
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BOX,
                         reducing_gap=None)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=optimize)
    return buf.getvalue()


# Test hook: a loader *process* that gets this chart key SIGKILLs itself (a decoder crash, for real).
KILL_ON_ENV = "RAG_ECG_TEST_KILL_LOADER_ON"
_in_loader_process = False


def load_chart(task: LoadTask) -> Loaded:
    """Worker: open one chart, prepare it for the encoder, measure it, make its thumbnail (never raises)."""
    if _in_loader_process and os.environ.get(KILL_ON_ENV) == task.key:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.perf_counter()
    out = Loaded(task.item_id, task.key, patient_id=task.meta.get("patient_id"))
    try:
        rec = None if task.kind == "image" else chart_record(task.kind, task.path, task.meta, task.key)
        page = (open_chart(task.kind, task.path, task.meta, key=task.key) if rec is None
                else draw_record(rec, task.preset, task.dpi, task.key or task.path))
        out.open_s = time.perf_counter() - t0
        out.thumb = jpeg_bytes(page, task.thumb_width)  # first: a refused picture is shown with its error
        out.full = jpeg_bytes(page, FULL_WIDTH, 85, optimize=False)
        out.pixels, out.measurements = _prepare(task, page, rec, out)
        if task.image_max_side:
            img = page.copy()
            img.thumbnail((task.image_max_side, task.image_max_side), Image.Resampling.LANCZOS)
            out.image = img
    except MemoryError:
        out.error = f"{task.key}: too large to load (out of memory)"
    except Exception as exc:  # a bad chart must never stop the batch: record why and go on
        out.error = one_line(task.key, exc)
    out.load_s = time.perf_counter() - t0
    return out


def _ping() -> int:
    return os.getpid()


def _loader_init(parent_pid: int) -> None:
    """In each loader process: die with the parent (a kill -9 of the review must not leave orphans)."""
    global _in_loader_process
    _in_loader_process = True
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() != parent_pid:  # the parent already died while this process started
            os._exit(0)


class Loader:
    """Loads charts in worker processes (or in this process when workers <= 1), a few batches ahead."""

    def __init__(self, workers: int, prefetch: int = 2):
        self.workers = workers
        self.prefetch = max(1, prefetch)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> "Loader":
        """Start the worker processes now: before this process runs torch (a child forked after that can hang
        in torch's inherited OpenMP state when the digitiser's segmenter runs there)."""
        if self.workers > 1:
            self._get_pool()
        return self

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # fork (Linux): instant, and callers need no `if __name__ == "__main__"` guard; the workers are
            # forked before the encoder runs and never touch torch. Elsewhere: spawn.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() and sys.platform == "linux"
                                 else "spawn")
            pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_loader_init,
                                       initargs=(os.getpid(),))
            try:
                pool.submit(_ping).result(timeout=300)
            except Exception as exc:
                pool.shutdown(wait=False, cancel_futures=True)
                raise ReviewError(f"cannot start {self.workers} chart loader processes ({type(exc).__name__}: "
                                  f"{exc}); run with workers=1 to load in this process") from None
            self._pool = pool
        return self._pool

    def batches(self, task_batches: Iterable[tuple[Any, list[LoadTask]]]) -> Iterator[tuple[Any, list[Loaded]]]:
        """(tag, tasks) -> (tag, loaded) in order; the next batches load while the caller works on this one."""
        if self.workers <= 1:
            for tag, tasks in task_batches:
                yield tag, [load_chart(t) for t in tasks]
            return
        window: deque[tuple[Any, list[LoadTask], ProcessPoolExecutor, list[Future]]] = deque()
        for tag, tasks in task_batches:
            pool = self._get_pool()
            window.append((tag, tasks, pool, [self._submit(pool, t) for t in tasks]))
            if len(window) > self.prefetch:
                yield self._resolve(*window.popleft())
        while window:
            yield self._resolve(*window.popleft())

    @staticmethod
    def _submit(pool: ProcessPoolExecutor, task: LoadTask) -> Future:
        """The task on `pool`; a pool already broken (a worker died since) gives a failed future: retried."""
        try:
            return pool.submit(load_chart, task)
        except BrokenProcessPool as exc:
            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    def _resolve(self, tag: Any, tasks: list[LoadTask], pool: ProcessPoolExecutor,
                 futures: list[Future]) -> tuple[Any, list[Loaded]]:
        out = []
        for task, fut in zip(tasks, futures):
            try:
                out.append(fut.result())
            except (BrokenProcessPool, CancelledError):  # a worker died (maybe on another chart): retry
                self._drop(pool)
                out.append(self._retry_alone(task))
        return tag, out

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        """Forget a broken pool (if it is still the current one); the next submit starts a fresh one.
        Only a broken pool is dropped: the prefetched batches of a healthy one are never cancelled."""
        if self._pool is pool:
            self.close()

    def _retry_alone(self, task: LoadTask) -> Loaded:
        """A worker died (a decoder crash): on a healthy pool, try this chart once more on its own."""
        pool = self._get_pool()
        try:
            return pool.submit(load_chart, task).result()
        except (BrokenProcessPool, CancelledError):
            self._drop(pool)
            return Loaded(task.item_id, task.key, error=f"{task.key}: crashed the chart loader process")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
