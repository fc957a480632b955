"""The per-chart pipeline both engines run: embed -> search -> not-an-ECG check -> report, on batches.

Why one class: the local loop and the Ray actors must give the same results, so they share these stages;
`PipelineSpec` is picklable, so each Ray actor (or process) rebuilds the same pipeline from it.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rag_ecg.data.store import Store, open_store
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import BackendError
from rag_ecg.reader.backends import BACKENDS, get_backend
from rag_ecg.reader.interpret import interpret
from rag_ecg.reader.report import Report
from rag_ecg.review.config import ReviewError
from rag_ecg.review.inputs import chart_kind
from rag_ecg.review.loader import LoadTask, Loaded, one_line
from rag_ecg.search.evidence import Evidence
from rag_ecg.search.retrieve import NotAnECGError, Retriever


@dataclass
class PipelineSpec:
    """Everything needed to rebuild the per-chart pipeline in another process or on a Ray worker."""

    index_dir: str
    store_url: str
    backend: str = "retrieval"
    backend_options: dict = field(default_factory=dict)
    k: int = 8
    preset: str = "clean"
    dpi: int = 100
    device: str = "cpu"
    workers: int = 2  # concurrent calls for text backends
    batch: int = 16  # rows of every encoder forward pass / search call (the last one padded)
    thumb_width: int = 320
    image_max_side: int = 1600


@dataclass
class ChartResult:
    """One chart's outcome, ready to be written to its ReviewItem."""

    item_id: int
    status: str  # done | unparsed (the answer is no report) | error | pending (the backend failed: next run)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    report: dict | None = None  # Report.to_dict()
    neighbours: list[dict] | None = None
    thumb: bytes | None = None
    full: bytes | None = None  # the chart FULL_WIDTH px wide, for the page's full-size view
    overlay: bytes | None = None  # a digitised picture with its read traces drawn over it


def neighbour_rows(evidence: Evidence) -> list[dict]:
    """The neighbours as stored with a chart (scores rounded: they are for people and sorting)."""
    return [{"case_id": int(n.case_id), "score": round(float(n.score), 6), "source": n.source,
             "external_id": n.external_id, "labels": list(n.labels), "image_path": n.image_path,
             "similarity_pct": n.similarity_pct}
            for n in evidence.neighbours]


class ChartPipeline:
    """Embed -> search -> not-an-ECG check -> report, for batches of loaded charts (both engines)."""

    def __init__(self, spec: PipelineSpec, store: Store | None = None, retriever=None, backend=None):
        self.spec = spec
        self._store = store
        if retriever is not None:
            self.__dict__["retriever"] = retriever
        if backend is not None:
            self.__dict__["backend"] = backend

    @cached_property
    def store(self) -> Store:
        return self._store or open_store(self.spec.store_url)

    @cached_property
    def retriever(self):
        return Retriever.open(Path(self.spec.index_dir), self.store, device=self.spec.device)

    @cached_property
    def encoder(self):
        if "retriever" in self.__dict__:
            return self.retriever.encoder
        return ECGEncoder.load(Path(self.spec.index_dir) / "encoder", device=self.spec.device)

    @cached_property
    def backend(self):
        return get_backend(self.spec.backend, **self.spec.backend_options)

    @property
    def needs_image(self) -> bool:
        """Text backends look at the chart; the retrieval reader needs only the evidence."""
        if self.spec.backend not in BACKENDS:
            raise ReviewError(f"unknown backend {self.spec.backend!r}: choose one of {', '.join(BACKENDS)}")
        return self.spec.backend != "retrieval"

    def load_task(self, item_id: int, key: str, path: str, meta: dict | None = None) -> LoadTask:
        return LoadTask(item_id, key, path, chart_kind(key), dict(meta or {}), self.encoder.preprocess,
                        self.spec.preset, self.spec.dpi, self.spec.thumb_width,
                        self.spec.image_max_side if self.needs_image else 0)

    # -- stages (each times itself; per-chart seconds are the batch time shared equally) ---------------
    def _fixed_chunks(self, n: int) -> Iterator[tuple[int, int]]:
        """(start, stop) chunks of `batch` rows; callers pad the last one to the full size, so every
        forward pass and search has the same shape and a chart's result does not depend on which charts
        share its batch (CPU kernels pick algorithms by shape): a resumed run reproduces an uninterrupted
        one bit for bit. (Processes whose torch starts with other thread settings, e.g. Ray actors, agree
        to float32 rounding: ~1e-7 on similarities.)"""
        b = max(1, self.spec.batch)
        for lo in range(0, n, b):
            yield lo, min(n, lo + b)

    def _pad(self, rows: np.ndarray) -> np.ndarray:
        short = max(1, self.spec.batch) - len(rows)
        return np.concatenate([rows, np.repeat(rows[:1], short, axis=0)]) if short > 0 else rows

    def embed(self, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
        """n letterboxed pages (H, W, 3) uint8 -> ((n, d) float32 L2-normalised, seconds per chart)."""
        if not len(pixels):
            return np.zeros((0, self.encoder.embed_dim), np.float32), 0.0
        t0 = time.perf_counter()
        stack = np.stack(pixels)
        emb = np.concatenate([self.encoder.embed_pixels(self._pad(stack[lo:hi]))[: hi - lo]
                              for lo, hi in self._fixed_chunks(len(stack))])
        return emb, (time.perf_counter() - t0) / len(pixels)

    def search(self, emb: np.ndarray, patients: Sequence[str | None]) -> tuple[list[Evidence | str], float]:
        """(n, d) embeddings -> per chart its Evidence, or an error line when it does not look like an ECG."""
        if len(emb) == 0:
            return [], 0.0
        t0 = time.perf_counter()
        evs = []
        for lo, hi in self._fixed_chunks(len(emb)):
            pad = max(1, self.spec.batch) - (hi - lo)
            found = self.retriever.search_embeddings(self._pad(emb[lo:hi]), k=self.spec.k,
                                                     exclude_patients=list(patients[lo:hi]) + [None] * pad)
            evs += found[: hi - lo]
        out: list = []
        for ev in evs:
            try:
                self.retriever.check(ev)
                out.append(ev)
            except NotAnECGError as exc:
                out.append(str(exc))
        return out, (time.perf_counter() - t0) / len(evs)

    def report(self, items: Sequence[tuple[Any, Evidence, dict | None]]) -> list[tuple[Any, float]]:
        """(image | None, evidence, measurements | None) -> (Report | BackendError | Exception, seconds) in
        input order; the measurements go into the report (and a text backend's prompt)."""
        backend = self.backend

        def one(item):
            t0 = time.perf_counter()
            try:
                rep = interpret(item[0], item[1], backend, measurements=item[2])
            except Exception as exc:  # BackendError: retried next run; anything else: that chart's error
                rep = exc
            return rep, time.perf_counter() - t0

        # vLLM serves many requests at once (--workers threads); an in-process model takes what it says
        limit = self.spec.workers if self.spec.backend == "vllm" else backend.max_concurrency
        workers = max(1, min(limit, len(items) or 1))
        if backend.composes_reports or workers == 1:
            return [one(it) for it in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="review-report") as pool:
            return list(pool.map(one, items))

    def process(self, loaded: Sequence[Loaded]) -> list[ChartResult]:
        """Loaded charts -> results (errors recorded per chart)."""
        results = {l.item_id: ChartResult(l.item_id, "error", l.error, open_timings(l.load_s, l.open_s),
                                          thumb=l.thumb, full=l.full, overlay=l.overlay) for l in loaded}
        ok = [l for l in loaded if l.error is None]
        emb, t_embed = self.embed([l.pixels for l in ok])
        evs, t_search = self.search(emb, [l.patient_id for l in ok])
        for l in ok:
            results[l.item_id].timings.update(embed=round(t_embed, 6), search=round(t_search, 6))
        to_report = []
        for l, ev in zip(ok, evs):
            if isinstance(ev, str):
                results[l.item_id].error = f"{l.key}: {ev}"
            else:
                to_report.append((l, ev))
        outcomes = self.report([(l.image, ev, l.measurements) for l, ev in to_report])
        for (l, ev), (rep, dt) in zip(to_report, outcomes):
            finish_result(results[l.item_id], l.key, ev, rep, dt)
        return [results[l.item_id] for l in loaded]

    def close(self) -> None:
        if "backend" in self.__dict__:
            self.backend.close()


def open_timings(load_s: float, open_s: float | None) -> dict[str, float]:
    """A chart's first timings: `load` (open + preprocess) and, when the page opened, `open` — which also tells
    the outputs that the file is a picture worth showing again, even if it was then refused as no ECG."""
    out = {"load": round(load_s, 6)}
    if open_s is not None:
        out["open"] = round(open_s, 6)
    return out


def finish_result(res: ChartResult, key: str, evidence: Evidence, rep: Any, report_s: float) -> ChartResult:
    """Fill a result from the reader's outcome: a Report (done; `unparsed` when the reader's answer held no
    valid report, kept verbatim), a BackendError (pending) or a failure (error)."""
    res.timings["report"] = round(report_s, 6)
    res.neighbours = neighbour_rows(evidence)
    if isinstance(rep, Report) and not rep.parsed:
        res.status, res.report = "unparsed", rep.to_dict()
        res.error = f"{key}: the reader's answer is not a report ({' '.join(str(rep.parse_error).split())})"
    elif isinstance(rep, Report):
        res.status, res.error, res.report = "done", None, rep.to_dict()
    elif isinstance(rep, BackendError):
        res.status, res.error = "pending", one_line(key, rep)
    else:
        res.status, res.error = "error", one_line(key, rep)
    return res


def check_backend(backend: str, results: Sequence[ChartResult]) -> None:
    """Stop the run when every chart of a batch that reached the reader failed there (backend down)."""
    reached = [r for r in results if "report" in r.timings]
    failed = [r for r in reached if r.status == "pending"]
    if failed and len(failed) == len(reached):
        why = next((r.error for r in failed if "is unreachable" in (r.error or "")), failed[0].error)  # breaker
        raise BackendError(f"backend {backend}: every chart of the last batch failed ({why}); "
                           f"they stay pending: fix the backend and re-run")
