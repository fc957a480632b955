"""Batch chart review: a folder, CSV or store query of charts -> a durable job in the store -> outputs.

Why this shape: a hospital backlog is thousands of charts and a run may die at any moment (kill -9, a
reboot, a broken backend). Each chart is one `ReviewItem`; a batch's results and its `done`/`error`
statuses are written in one transaction, so a re-run of the same command finds the same job (its key
hashes the input and the settings that change results) and only does what is still pending. Outputs
(`results.csv`, `results.jsonl`, `index.html` + `thumbs/`, `manifest.json`) are regenerated from the
store at the end of every run, so they are complete after a resume.

Per chart: load/validate (worker processes) -> embed (batched) -> search -> not-an-ECG check ->
report (backend; concurrent calls for vLLM) -> store row. `engine="ray"` runs the same stages on Ray Data
(`rag_ecg.review.ray_engine`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from rag_ecg import __version__, paths
from rag_ecg.data.images import IMAGE_SUFFIXES
from rag_ecg.data.store import Case, ReviewItem, ReviewJob, Store, open_store
from rag_ecg.errors import RagEcgError

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.search.evidence import Evidence

STAGES = ("load", "embed", "search", "report")
ENGINES = ("local", "ray")
STORE_FILTERS = ("source", "fold", "split", "limit")
THUMBS = "thumbs"
# backend options that do not change a report (where the server is, how long to wait, secrets)
RESULT_NEUTRAL_OPTIONS = frozenset({"base_url", "api_key", "timeout_s", "max_retries", "backoff_s",
                                    "max_concurrency", "device"})


class ReviewError(RagEcgError, RuntimeError):
    """The review cannot start or go on (bad input, missing index, backend down); the message says why."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ReviewConfig:
    """Settings of a batch review (those in `result_settings()` are part of the job key)."""

    backend: str = "retrieval"  # reader: retrieval | hf | vllm
    backend_options: dict = field(default_factory=dict)  # passed to llm.get_backend (model_path, base_url, ...)
    k: int = 8  # neighbours retrieved (and shown) per chart
    workers: int = 2  # chart loading/rendering processes, and concurrent LLM calls for text backends
    batch_size: int = 16  # charts per encoder forward pass and per store commit
    engine: str = "local"  # local (this machine) | ray (Ray Data: a local instance or a cluster)
    limit: int | None = None  # add at most this many charts of the input to the job (first in input order)
    preset: str = "clean"  # render preset for WFDB / store charts (signals are drawn as pages first)
    dpi: int | None = None  # render resolution for WFDB / store charts (None: the index's build dpi)
    device: str = "cpu"  # encoder device (cpu | cuda | auto)
    max_attempts: int = 3  # a chart that was being processed when a run died this often is marked error
    retry_errors: bool = False  # put charts that ended in error back to pending before running
    thumb_width: int = 320  # width in px of the chart / neighbour thumbnails written under thumbs/
    image_max_side: int = 1600  # longest side in px of the page handed to text (LLM) backends
    html_rows: int = 2000  # most charts listed in index.html (results.csv / .jsonl always hold all)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ReviewError(f"engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.k < 1 or self.batch_size < 1 or self.workers < 0 or self.max_attempts < 1:
            raise ReviewError(f"review settings: k ({self.k}), batch_size ({self.batch_size}) and max_attempts "
                              f"({self.max_attempts}) must be >= 1 and workers ({self.workers}) >= 0")
        if self.limit is not None and self.limit < 1:
            raise ReviewError(f"limit {self.limit}: must be >= 1 (or None for all charts)")

    def result_settings(self) -> dict:
        """The settings that change a chart's result (secrets left out): they make the job key."""
        opts = {k: v for k, v in sorted(self.backend_options.items())
                if k not in RESULT_NEUTRAL_OPTIONS and not any(s in k.lower() for s in ("password", "secret"))}
        return {"backend": self.backend, "backend_options": opts, "k": self.k, "preset": self.preset,
                "dpi": self.dpi}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReviewConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ReviewError(f"review config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ReviewConfig":
        import yaml

        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ReviewError(f"{path}: cannot read review config ({exc})") from None
        if not isinstance(d, dict):
            raise ReviewError(f"{path}: review config must be a mapping of field: value")
        return cls.from_dict(d.get("review", d) if isinstance(d.get("review"), dict) else d)


@dataclass
class ReviewSummary:
    """What a run did and where its outputs are (the CLI prints it)."""

    job_id: int
    key: str  # the job key (hash of input + result settings)
    input: str
    out_dir: Path
    total: int  # charts in the job
    done: int
    error: int
    pending: int  # left for the next run (backend failures)
    processed: int  # charts finished (done or error) by this run
    resumed: bool  # the job existed before this run
    elapsed_s: float  # wall time of this run's chart processing
    charts_per_s: float  # processed / elapsed_s
    stage_s: dict[str, float] = field(default_factory=dict)  # summed per-chart seconds per stage, this run
    outputs: dict[str, str] = field(default_factory=dict)  # name -> file path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d

    def text(self) -> str:
        """What the CLI prints after a run."""
        what = "resumed job" if self.resumed else "new job"
        lines = [f"{what} {self.job_id} ({self.key[:12]}): {self.total} charts: {self.done} done, "
                 f"{self.error} error, {self.pending} pending",
                 f"this run: {self.processed} charts in {self.elapsed_s:.1f}s ({self.charts_per_s:.1f} charts/s)"]
        if self.processed:
            total = sum(self.stage_s.values()) or 1.0
            lines.append("time per stage: " + ", ".join(f"{k} {v / total:.0%}" for k, v in self.stage_s.items()))
        if self.pending:
            lines.append("charts left pending (the backend failed): fix it and run the same command again")
        lines += [f"{name}: {path}" for name, path in self.outputs.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Chart:
    """One chart of the input: `key` is stable across runs (relative path, or `case:<id>`)."""

    key: str
    path: str  # image/PDF file, WFDB record path without extension, or a store case's signal path
    kind: str  # image | wfdb | case


def chart_kind(key: str) -> str:
    """The kind of a chart from its key (so pending items can be rebuilt from their store rows)."""
    if key.startswith("case:"):
        return "case"
    return "wfdb" if key.lower().endswith(".hea") else "image"


def discover(input: str | Path, store: Store | None = None, out_dir: Path | None = None,
             limit: int | None = None) -> tuple[str, list[Chart]]:
    """Input -> (descriptor for the job key, charts in a stable order).

    A folder is walked recursively (PNG/JPEG/BMP/TIFF/PDF files and WFDB `.hea` records; `out_dir` and
    hidden folders skipped); a `.csv` needs a `path` column (relative paths resolved against its folder);
    `store:source=ptbxl,fold=9[,split=val][,limit=50]` selects store cases, drawn as pages; a single
    chart file is a batch of one.
    """
    text = str(input)
    if text.startswith("store:"):
        if store is None:
            raise ReviewError(f"{text}: a store query needs a store")
        return _discover_store(text, store, limit)
    path = Path(text).expanduser()
    if not path.exists():
        raise ReviewError(f"{text}: no such file or folder (expected a folder of charts, a CSV with a path "
                          f"column, or store:source=...,fold=...)")
    path = path.resolve()
    if path.is_dir():
        charts = _discover_folder(path, out_dir)
        desc = f"dir:{path}"
    elif path.suffix.lower() == ".csv":
        charts = _discover_csv(path)
        desc = f"csv:{path}"
    elif path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == ".hea":
        kind = "wfdb" if path.suffix.lower() == ".hea" else "image"
        charts = [Chart(path.name, str(path.with_suffix("") if kind == "wfdb" else path), kind)]
        desc = f"file:{path}"
    else:
        raise ReviewError(f"{text}: not a folder, a .csv list or a chart file "
                          f"({', '.join(IMAGE_SUFFIXES)}, .hea)")
    if not charts:
        raise ReviewError(f"{text}: no charts found (PNG/JPEG/BMP/TIFF/PDF files or WFDB .hea records)")
    return desc, charts[:limit] if limit else charts


def _discover_folder(root: Path, out_dir: Path | None) -> list[Chart]:
    skip = out_dir.resolve() if out_dir is not None else None
    charts = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            p = here / name
            rel = p.relative_to(root).as_posix()
            if suffix in IMAGE_SUFFIXES:
                charts.append(Chart(rel, str(p), "image"))
            elif suffix == ".hea":
                charts.append(Chart(rel, str(p.with_suffix("")), "wfdb"))
    return sorted(charts, key=lambda c: c.key)


def _discover_csv(path: Path) -> list[Chart]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = cols = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in cols:
                raise ReviewError(f"{path}: no 'path' column (columns: {', '.join(cols) or 'none'})")
            values = [(row.get("path") or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReviewError(f"{path}: unreadable CSV ({exc})") from None
    charts, seen = [], set()
    for v in values:
        if not v:
            continue
        p = Path(v).expanduser()
        p = p if p.is_absolute() else path.parent / p
        is_wfdb = p.suffix.lower() == ".hea" or (p.suffix.lower() not in IMAGE_SUFFIXES
                                                   and p.with_name(p.name + ".hea").exists())
        key = v if (not is_wfdb or v.lower().endswith(".hea")) else v + ".hea"
        if key in seen:
            continue
        seen.add(key)
        if is_wfdb:
            charts.append(Chart(key, str(p.with_suffix("") if p.suffix.lower() == ".hea" else p), "wfdb"))
        else:
            charts.append(Chart(key, str(p), "image"))
    return charts


def parse_store_query(text: str) -> dict:
    """`store:source=ptbxl,fold=9,limit=50` -> {"source": "ptbxl", "fold": 9, "limit": 50}."""
    body = text[len("store:"):].strip()
    out: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise ReviewError(f"{text}: {part!r} is not name=value")
        if name not in STORE_FILTERS:
            raise ReviewError(f"{text}: unknown filter {name!r} (use {', '.join(STORE_FILTERS)})")
        if name in ("fold", "limit"):
            try:
                out[name] = int(value)
            except ValueError:
                raise ReviewError(f"{text}: {name} must be an integer, got {value!r}") from None
        else:
            out[name] = value
    return out


def _discover_store(text: str, store: Store, limit: int | None) -> tuple[str, list[Chart]]:
    q = parse_store_query(text)
    stmt = select(Case.id, Case.signal_path).order_by(Case.id)
    if "source" in q:
        stmt = stmt.where(Case.source == q["source"])
    if "fold" in q:
        stmt = stmt.where(Case.fold == q["fold"])
    if "split" in q:
        stmt = stmt.where(Case.split == q["split"])
    caps = [x for x in (q.get("limit"), limit) if x]
    if caps:
        stmt = stmt.limit(min(caps))
    with store.session() as s:
        rows = s.execute(stmt).all()
    if not rows:
        raise ReviewError(f"{text}: no cases in {store!r} match")
    desc = "store:" + ",".join(f"{k}={q[k]}" for k in sorted(q) if k != "limit")
    charts = [Chart(f"case:{cid}", sig, "case") for cid, sig in rows]
    return desc, charts


# ---------------------------------------------------------------------------------------------- loading


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
    image: Any = None  # PIL page for text backends (longest side <= image_max_side), else None
    patient_id: str | None = None  # query's own patient (store charts): excluded from its neighbours
    error: str | None = None  # one line naming the chart and the problem
    load_s: float = 0.0


def one_line(key: str, exc: BaseException) -> str:
    """An exception as one line that names the chart."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = Path(key).name
    if name not in text and key not in text:
        text = f"{key}: {text}"
    return text if len(text) <= 300 else text[:299] + "…"


def open_chart(kind: str, path: str, meta: dict, preset: str = "clean", dpi: int = 100,
               key: str | None = None) -> "Image.Image":
    """A chart as a PIL RGB page: image files are read, WFDB records and store cases are drawn."""
    if kind == "image":
        from rag_ecg.data.images import load_image

        return load_image(path)
    from rag_ecg.paper.render import render_page

    if kind == "wfdb":
        from rag_ecg.data.records import read_wfdb

        rec = read_wfdb(path, record_id=key or Path(path).name)
    elif kind == "case":
        from rag_ecg.data.store import load_case_record

        case = Case(source=meta.get("source") or "wfdb", external_id=meta.get("external_id") or "",
                    signal_path=path, patient_id=meta.get("patient_id"))
        rec = load_case_record(case)
    else:
        raise ValueError(f"{path}: unknown chart kind {kind!r}")
    # A seed per chart: a clean page is the same either way, but artifact presets should differ chart to chart.
    seed = int(hashlib.sha256((key or path).encode()).hexdigest()[:8], 16) if preset != "clean" else 0
    return render_page(rec, preset=preset, seed=seed, dpi=dpi)


def jpeg_bytes(image: "Image.Image", width: int, quality: int = 80) -> bytes:
    """A small JPEG of a page, `width` px wide (never upscaled)."""
    from PIL import Image as PILImage

    img = image.convert("RGB")
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), PILImage.Resampling.BOX,
                         reducing_gap=None)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def load_chart(task: LoadTask) -> Loaded:
    """Worker: open one chart, letterbox it for the encoder, make its thumbnail (never raises)."""
    t0 = time.perf_counter()
    out = Loaded(task.item_id, task.key, patient_id=task.meta.get("patient_id"))
    try:
        page = open_chart(task.kind, task.path, task.meta, task.preset, task.dpi, task.key)
        out.pixels = task.preprocess.pixels(page)
        out.thumb = jpeg_bytes(page, task.thumb_width)
        if task.image_max_side:
            from PIL import Image as PILImage

            img = page.copy()
            img.thumbnail((task.image_max_side, task.image_max_side), PILImage.Resampling.LANCZOS)
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
    if sys.platform == "linux":
        import ctypes
        import signal

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

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

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
        window: deque[tuple[Any, list[LoadTask], list[Future]]] = deque()
        for tag, tasks in task_batches:
            window.append((tag, tasks, [self._get_pool().submit(load_chart, t) for t in tasks]))
            if len(window) > self.prefetch:
                yield self._resolve(*window.popleft())
        while window:
            yield self._resolve(*window.popleft())

    def _resolve(self, tag: Any, tasks: list[LoadTask], futures: list[Future]) -> tuple[Any, list[Loaded]]:
        out = []
        for task, fut in zip(tasks, futures):
            try:
                out.append(fut.result())
            except BrokenProcessPool:
                out.append(self._retry_alone(task))
        return tag, out

    def _retry_alone(self, task: LoadTask) -> Loaded:
        """A worker died (a decoder crash): on a fresh pool, try this chart once more on its own."""
        self.close()
        try:
            return self._get_pool().submit(load_chart, task).result()
        except BrokenProcessPool:
            self.close()
            return Loaded(task.item_id, task.key, error=f"{task.key}: crashed the chart loader process")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------- pipeline


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
    status: str  # done | error | pending (the backend failed: retried by the next run)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    report: dict | None = None  # Report.to_dict()
    neighbours: list[dict] | None = None
    thumb: bytes | None = None


def neighbour_rows(evidence: "Evidence") -> list[dict]:
    """The neighbours as stored with a chart (scores rounded: they are for people and sorting)."""
    return [{"case_id": int(n.case_id), "score": round(float(n.score), 6), "source": n.source,
             "external_id": n.external_id, "labels": list(n.labels), "image_path": n.image_path}
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
        from rag_ecg.search.retrieve import Retriever

        return Retriever.open(Path(self.spec.index_dir), self.store, device=self.spec.device)

    @cached_property
    def encoder(self):
        if "retriever" in self.__dict__:
            return self.retriever.encoder
        from rag_ecg.encoder.model import ECGEncoder

        return ECGEncoder.load(Path(self.spec.index_dir) / "encoder", device=self.spec.device)

    @cached_property
    def backend(self):
        from rag_ecg.reader.interpret import get_backend

        return get_backend(self.spec.backend, **self.spec.backend_options)

    @property
    def needs_image(self) -> bool:
        """Text backends look at the chart; the retrieval reader needs only the evidence."""
        from rag_ecg.reader.interpret import BACKENDS

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

    def search(self, emb: np.ndarray, patients: Sequence[str | None]) -> tuple[list["Evidence | str"], float]:
        """(n, d) embeddings -> per chart its Evidence, or an error line when it does not look like an ECG."""
        if len(emb) == 0:
            return [], 0.0
        from rag_ecg.search.retrieve import NotAnECGError

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

    def report(self, items: Sequence[tuple[Any, "Evidence"]]) -> list[tuple[Any, float]]:
        """(image | None, evidence) pairs -> (Report | BackendError | Exception, seconds) in input order."""
        from rag_ecg.reader.interpret import interpret

        backend = self.backend

        def one(item):
            t0 = time.perf_counter()
            try:
                rep = interpret(item[0], item[1], backend)
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
        results = {l.item_id: ChartResult(l.item_id, "error", l.error, {"load": round(l.load_s, 6)},
                                          thumb=l.thumb) for l in loaded}
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
        for (l, ev), (rep, dt) in zip(to_report, self.report([(l.image, ev) for l, ev in to_report])):
            finish_result(results[l.item_id], l.key, ev, rep, dt)
        return [results[l.item_id] for l in loaded]

    def close(self) -> None:
        if "backend" in self.__dict__:
            self.backend.close()


def finish_result(res: ChartResult, key: str, evidence: "Evidence", rep: Any, report_s: float) -> ChartResult:
    """Fill a result from the reader's outcome: a Report (done), a BackendError (pending) or a failure."""
    from rag_ecg.reader.interpret import BackendError
    from rag_ecg.reader.report import Report

    res.timings["report"] = round(report_s, 6)
    res.neighbours = neighbour_rows(evidence)
    if isinstance(rep, Report):
        res.status, res.error, res.report = "done", None, rep.to_dict()
    elif isinstance(rep, BackendError):
        res.status, res.error = "pending", one_line(key, rep)
    else:
        res.status, res.error = "error", one_line(key, rep)
    return res


# ---------------------------------------------------------------------------------------------- job


def index_info(index_dir: Path) -> dict:
    """The index identity that changes results (path, encoder hash, build time) and its build dpi."""
    from rag_ecg.search.retrieve import MANIFEST

    mpath = index_dir / MANIFEST
    if not mpath.exists():
        raise ReviewError(f"{index_dir}: no finished index here (build it with `python cli.py build-index`)")
    m = json.loads(mpath.read_text())
    return {"path": str(index_dir.resolve()), "encoder_hash": m.get("encoder_hash"), "built": m.get("built"),
            "count": m.get("count"), "dpi": int((m.get("build") or {}).get("dpi") or 100)}


def resolve_index_dir(index: str | Path | None) -> Path:
    """An index folder, or the name of one under `paths.index_dir()` (default: `default`)."""
    if index is None:
        return paths.index_dir() / "default"
    p = Path(index).expanduser()
    if p.is_dir() or len(p.parts) > 1:
        return p
    return paths.index_dir() / str(index)


def job_key(descriptor: str, cfg: ReviewConfig, index: dict) -> str:
    """sha256 of the input, the result settings and the index identity: the same command, the same job."""
    blob = json.dumps({"input": descriptor, "settings": cfg.result_settings(),
                       "index": {k: index[k] for k in ("path", "encoder_hash", "built")}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_job(store: Store, key: str, descriptor: str, out_dir: Path, settings: dict) -> tuple[int, bool]:
    """(job id, existed before): find the job by key, or create it (safe against a concurrent creator)."""
    with store.session() as s:
        job = s.scalar(select(ReviewJob).where(ReviewJob.key == key))
        if job is not None:  # the same job: record where this run writes and with what settings
            job.out_dir, job.status, job.settings = str(out_dir), "running", settings
            return job.id, True
    try:
        with store.session() as s:
            job = ReviewJob(key=key, input=descriptor, out_dir=str(out_dir), settings=settings, status="running")
            s.add(job)
            s.flush()
            return job.id, False
    except IntegrityError:
        with store.session() as s:
            return s.scalar(select(ReviewJob.id).where(ReviewJob.key == key)), True


def add_items(store: Store, job_id: int, charts: Sequence[Chart], chunk: int = 1000) -> int:
    """Insert the charts the job does not hold yet (pending); returns how many were added."""
    with store.session() as s:
        have = set(s.scalars(select(ReviewItem.chart_key).where(ReviewItem.job_id == job_id)))
    new = [c for c in charts if c.key not in have]
    for lo in range(0, len(new), chunk):
        with store.session() as s:
            s.execute(insert(ReviewItem), [{"job_id": job_id, "chart_key": c.key, "path": c.path,
                                            "status": "pending", "attempts": 0, "timings": {}}
                                           for c in new[lo:lo + chunk]])
    return len(new)


def status_counts(store: Store, job_id: int) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(select(ReviewItem.status, func.count()).where(ReviewItem.job_id == job_id)
                         .group_by(ReviewItem.status)).all()
    out = {"pending": 0, "done": 0, "error": 0}
    out.update({st: int(n) for st, n in rows})
    return out


def pending_batches(store: Store, job_id: int, batch_size: int) -> Iterator[list[tuple[int, str, str, int]]]:
    """Pending items as batches of (id, chart_key, path, attempts), by id, read page by page."""
    last = 0
    while True:
        with store.session() as s:
            rows = s.execute(select(ReviewItem.id, ReviewItem.chart_key, ReviewItem.path, ReviewItem.attempts)
                             .where(ReviewItem.job_id == job_id, ReviewItem.status == "pending",
                                    ReviewItem.id > last)
                             .order_by(ReviewItem.id).limit(batch_size * 8)).all()
        if not rows:
            return
        last = rows[-1][0]
        for lo in range(0, len(rows), batch_size):
            yield [tuple(r) for r in rows[lo:lo + batch_size]]


def case_meta(store: Store, keys: Sequence[str]) -> dict[str, dict]:
    """Store charts' case metadata (source, external id, patient) by chart key."""
    ids = [int(k[5:]) for k in keys if k.startswith("case:") and k[5:].isdigit()]
    if not ids:
        return {}
    with store.session() as s:
        rows = s.execute(select(Case.id, Case.source, Case.external_id, Case.patient_id)
                         .where(Case.id.in_(ids))).all()
    return {f"case:{cid}": {"source": src, "external_id": ext, "patient_id": pat} for cid, src, ext, pat in rows}


def start_attempts(store: Store, batch: Sequence[tuple], max_attempts: int) -> list[ChartResult]:
    """Count an attempt for each chart of the batch (committed first); charts that had already used up
    `max_attempts` (runs died while on them) come back as error results instead of being tried again."""
    ids = [b[0] for b in batch]
    keys = {b[0]: b[1] for b in batch}
    with store.session() as s:
        s.execute(update(ReviewItem).where(ReviewItem.id.in_(ids)).values(attempts=ReviewItem.attempts + 1))
        rows = s.execute(select(ReviewItem.id, ReviewItem.attempts, ReviewItem.error)
                         .where(ReviewItem.id.in_(ids))).all()
    return [ChartResult(item_id, "error", f"{keys[item_id]}: gave up after {attempts - 1} attempts "
                                          f"({error or 'the review stopped while processing this chart'})")
            for item_id, attempts, error in sorted(rows) if attempts > max_attempts]


def write_thumb(out_dir: Path, name: str, data: bytes) -> None:
    atomic_write_bytes(out_dir / THUMBS / name, data)


def commit_results(store: Store, out_dir: Path, results: Sequence[ChartResult]) -> None:
    """Thumbnails first, then every result of the batch (status + data) in one transaction."""
    for r in results:
        if r.thumb:
            write_thumb(out_dir, f"chart-{r.item_id}.jpg", r.thumb)
    now = datetime.now(timezone.utc)
    with store.session() as s:
        for r in results:
            item = s.get(ReviewItem, r.item_id)
            if item is None:
                continue
            item.status, item.error, item.timings = r.status, r.error, dict(r.timings)
            item.report, item.neighbours = r.report, r.neighbours
            item.finished_at = now if r.status != "pending" else None


# ---------------------------------------------------------------------------------------------- engine


@dataclass
class BatchReport:
    """Handed to `on_batch` after each committed batch."""

    results: list[ChartResult]
    committed: int  # charts finished by this run so far


class _Progress:
    """A rich progress bar with charts/s and ETA (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:.1f} charts/s" if task.speed else "- charts/s")

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), disable=not enabled, transient=False)
        self.task = self.bar.add_task(description, total=total, completed=completed, errors=0)
        self.errors = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, results: Sequence[ChartResult]) -> None:
        self.errors += sum(r.status == "error" for r in results)
        self.bar.update(self.task, advance=sum(r.status != "pending" for r in results), errors=self.errors)


def _run_local(pipeline: ChartPipeline, store: Store, job_id: int, out_dir: Path, cfg: ReviewConfig,
               on_results: Callable[[list[ChartResult]], None]) -> None:
    """The local engine: loader processes feed batched embedding, search and reporting; commit per batch."""
    loader = Loader(cfg.workers)
    import torch

    # loader processes take `workers` cores: torch's OpenMP threads spin-wait badly when oversubscribed
    threads = torch.get_num_threads()
    if cfg.workers > 1 and pipeline.spec.device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, min(threads, cores - cfg.workers)))

    def task_batches() -> Iterator[tuple[list, list[LoadTask]]]:
        for batch in pending_batches(store, job_id, cfg.batch_size):
            meta = case_meta(store, [b[1] for b in batch])
            yield batch, [pipeline.load_task(i, key, path, meta.get(key)) for i, key, path, _ in batch]

    try:
        for batch, loaded in loader.batches(task_batches()):
            gave_up = start_attempts(store, batch, cfg.max_attempts)
            skip = {r.item_id for r in gave_up}
            results = pipeline.process([x for x in loaded if x.item_id not in skip]) + gave_up
            commit_results(store, out_dir, results)
            on_results(results)
            check_backend(pipeline.spec.backend, results)
    finally:
        loader.close()
        torch.set_num_threads(threads)


def check_backend(backend: str, results: Sequence[ChartResult]) -> None:
    """Stop the run when every chart of a batch that reached the reader failed there (backend down)."""
    reached = [r for r in results if "report" in r.timings]
    failed = [r for r in reached if r.status == "pending"]
    if failed and len(failed) == len(reached):
        raise ReviewError(f"backend {backend}: every chart of the last batch failed ({failed[0].error}); "
                          f"they stay pending: fix the backend and re-run")


def review(input: str | Path, out_dir: str | Path, store: Store | str | None = None,
           index_dir: str | Path | None = None, backend: str = "retrieval", k: int = 8, workers: int = 2,
           batch_size: int = 16, engine: str = "local", limit: int | None = None, progress: bool = True,
           backend_options: dict | None = None, preset: str = "clean", device: str = "cpu",
           retry_errors: bool = False, config: ReviewConfig | None = None,
           on_batch: Callable[[BatchReport], None] | None = None) -> ReviewSummary:
    """Review every chart of `input` (a folder, a CSV with a `path` column, or `store:source=..,fold=..`)
    into `out_dir`; re-running the same command resumes the same job. `config` overrides the keyword
    settings; `on_batch` is called after each committed batch (logging, metrics)."""
    cfg = config or ReviewConfig(backend=backend, backend_options=dict(backend_options or {}), k=k,
                                 workers=workers, batch_size=batch_size, engine=engine, limit=limit,
                                 preset=preset, device=device, retry_errors=retry_errors)
    own_store = not isinstance(store, Store)
    st = open_store(store) if own_store else store
    try:
        return _review(input, out_dir, st, index_dir, cfg, progress, on_batch)
    finally:
        if own_store:
            st.dispose()


def _review(input, out_dir, st: Store, index_dir, cfg: ReviewConfig, progress: bool,
            on_batch: Callable[[BatchReport], None] | None) -> ReviewSummary:
    out = Path(out_dir).expanduser().resolve()
    idx_dir = resolve_index_dir(index_dir)
    info = index_info(idx_dir)
    from rag_ecg.paper.artifacts import PRESETS

    if cfg.preset not in PRESETS:
        raise ReviewError(f"render preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    if cfg.dpi is None:
        cfg = replace(cfg, dpi=info["dpi"])  # draw WFDB / store charts like the index's pages
    descriptor, charts = discover(input, st, out, cfg.limit)
    key = job_key(descriptor, cfg, info)
    settings = {"review": asdict(cfg), "index": info, "rag_ecg_version": __version__}
    job_id, resumed = open_job(st, key, descriptor, out, settings)
    add_items(st, job_id, charts)
    if cfg.retry_errors:
        with st.session() as s:
            s.execute(update(ReviewItem).where(ReviewItem.job_id == job_id, ReviewItem.status == "error")
                      .values(status="pending", attempts=0))
    (out / THUMBS).mkdir(parents=True, exist_ok=True)

    spec = PipelineSpec(index_dir=str(idx_dir.resolve()), store_url=st.url, backend=cfg.backend,
                        backend_options=dict(cfg.backend_options), k=cfg.k, preset=cfg.preset, dpi=int(cfg.dpi),
                        device=cfg.device, workers=max(1, cfg.workers), batch=cfg.batch_size,
                        thumb_width=cfg.thumb_width,
                        image_max_side=cfg.image_max_side)
    counts = status_counts(st, job_id)
    total = sum(counts.values())
    stage_s = {s: 0.0 for s in STAGES}
    processed = 0
    t0 = time.perf_counter()
    pipeline = ChartPipeline(spec, store=st)
    pipeline.needs_image  # an unknown backend name fails here, before any chart is touched
    if cfg.engine == "local" and counts["pending"]:
        pipeline.retriever, pipeline.backend  # open them now, outside the per-chart stage timings
    try:
        if counts["pending"]:
            with _Progress(progress, total, total - counts["pending"], f"review {Path(str(input)).name}") as bar:
                def on_results(results: list[ChartResult]) -> None:
                    nonlocal processed
                    for r in results:
                        for stage, sec in r.timings.items():
                            stage_s[stage] = stage_s.get(stage, 0.0) + float(sec)
                    processed += sum(r.status != "pending" for r in results)
                    bar.advance(results)
                    if on_batch is not None:
                        on_batch(BatchReport(results, processed))

                if cfg.engine == "ray":
                    from rag_ecg.review.ray_engine import run_ray

                    run_ray(spec, st, job_id, out, cfg, on_results)
                else:
                    _run_local(pipeline, st, job_id, out, cfg, on_results)
    finally:
        pipeline.close()
        elapsed = time.perf_counter() - t0
        counts = status_counts(st, job_id)
        if counts["pending"] == 0:
            with st.session() as s:
                job = s.get(ReviewJob, job_id)
                job.status, job.finished_at = "done", datetime.now(timezone.utc)
        outputs = write_outputs(st, job_id, out, cfg, idx_dir)
    return ReviewSummary(job_id=job_id, key=key, input=descriptor, out_dir=out, total=sum(counts.values()),
                         done=counts["done"], error=counts["error"], pending=counts["pending"],
                         processed=processed, resumed=resumed, elapsed_s=round(elapsed, 3),
                         charts_per_s=round(processed / elapsed, 3) if elapsed > 0 and processed else 0.0,
                         stage_s={k: round(v, 3) for k, v in stage_s.items()},
                         outputs={k: str(v) for k, v in outputs.items()})


# ---------------------------------------------------------------------------------------------- outputs

CSV_COLUMNS = ("chart", "path", "status", "error", "top_diagnosis", "top_confidence", "diagnoses", "impression",
               "cited_cases", "neighbours", "attempts", "t_load_s", "t_embed_s", "t_search_s", "t_report_s",
               "t_total_s")


def item_row(item: ReviewItem) -> dict:
    """One chart as the outputs show it (plain JSON types)."""
    rep = item.report or {}
    diags = sorted(({"label": d.get("label"), "code": d.get("code"), "superclass": d.get("superclass"),
                     "confidence": float(d.get("confidence") or 0.0), "cited": list(d.get("cited") or [])}
                    for d in rep.get("diagnoses") or []), key=lambda d: -d["confidence"])
    impression = (rep.get("impression") or {}).get("text") if rep else None
    cited: dict[int, None] = {}
    for part in ([rep.get("rhythm")] + list(rep.get("findings") or []) + list(rep.get("diagnoses") or [])
                 + [rep.get("impression")]):
        for c in (part or {}).get("cited") or []:
            cited.setdefault(int(c), None)
    timings = {k: float(v) for k, v in (item.timings or {}).items()}
    timings["total"] = round(sum(timings.get(s, 0.0) for s in STAGES), 6)
    top = diags[0] if diags else None
    return {
        "id": item.id, "chart": item.chart_key, "path": item.path, "status": item.status, "error": item.error,
        "attempts": item.attempts, "diagnoses": diags,
        "top_diagnosis": _diag_name(top) if top else None, "top_confidence": top["confidence"] if top else None,
        "impression": impression, "rhythm": (rep.get("rhythm") or {}).get("text") if rep else None,
        "findings": [f.get("text") for f in rep.get("findings") or []], "cited_cases": list(cited),
        "neighbours": list(item.neighbours or []), "timings": timings, "report": item.report,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
    }


def _diag_name(d: dict) -> str:
    return d.get("superclass") if d.get("code") is None and d.get("superclass") else (d.get("code") or d["label"])


def csv_row(row: dict) -> dict:
    t = row["timings"]
    return {
        "chart": row["chart"], "path": row["path"], "status": row["status"], "error": row["error"] or "",
        "top_diagnosis": row["top_diagnosis"] or "",
        "top_confidence": "" if row["top_confidence"] is None else f"{row['top_confidence']:.4f}",
        "diagnoses": "; ".join(f"{_diag_name(d)} {d['confidence']:.2f}" for d in row["diagnoses"]),
        "impression": row["impression"] or "", "cited_cases": " ".join(map(str, row["cited_cases"])),
        "neighbours": " ".join(f"{n['case_id']}:{n['score']:.3f}" for n in row["neighbours"]),
        "attempts": row["attempts"],
        **{f"t_{s}_s": f"{t[s]:.4f}" if s in t else "" for s in STAGES}, "t_total_s": f"{t['total']:.4f}",
    }


def iter_rows(store: Store, job_id: int, page: int = 500) -> Iterator[dict]:
    last = 0
    while True:
        with store.session() as s:
            items = list(s.scalars(select(ReviewItem).where(ReviewItem.job_id == job_id, ReviewItem.id > last)
                                   .order_by(ReviewItem.id).limit(page)))
        if not items:
            return
        last = items[-1].id
        for it in items:
            yield item_row(it)


def write_outputs(store: Store, job_id: int, out_dir: Path, cfg: ReviewConfig,
                  index_dir: Path | None = None) -> dict[str, Path]:
    """results.csv, results.jsonl, index.html (+ thumbs) and manifest.json, all from the store."""
    from rag_ecg.review import html as review_html

    out_dir.mkdir(parents=True, exist_ok=True)
    with store.session() as s:
        job = s.get(ReviewJob, job_id)
        job_info = {"id": job.id, "key": job.key, "input": job.input, "status": job.status,
                    "settings": job.settings, "created_at": job.created_at.isoformat() if job.created_at else None}
    summary = {"by_status": {"done": 0, "error": 0, "pending": 0}, "by_superclass": {}, "confidence": [], "total": 0}
    shown: list[dict] = []
    csv_tmp, csv_path = _tmp_beside(out_dir / "results.csv")
    jsonl_tmp, jsonl_path = _tmp_beside(out_dir / "results.jsonl")
    try:
        with open(csv_tmp, "w", newline="", encoding="utf-8") as fc, open(jsonl_tmp, "w", encoding="utf-8") as fj:
            writer = csv.DictWriter(fc, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in iter_rows(store, job_id):
                writer.writerow(csv_row(row))
                fj.write(json.dumps({k: v for k, v in row.items() if k != "id"}, default=str) + "\n")
                summary["total"] += 1
                summary["by_status"][row["status"]] = summary["by_status"].get(row["status"], 0) + 1
                if row["status"] == "done":
                    for sup in sorted({d["superclass"] for d in row["diagnoses"] if d["superclass"]}):
                        summary["by_superclass"][sup] = summary["by_superclass"].get(sup, 0) + 1
                    if row["top_confidence"] is not None:
                        summary["confidence"].append(row["top_confidence"])
                if len(shown) < cfg.html_rows:
                    shown.append(row)
        os.replace(csv_tmp, csv_path)
        os.replace(jsonl_tmp, jsonl_path)
    finally:
        for tmp in (csv_tmp, jsonl_tmp):
            Path(tmp).unlink(missing_ok=True)
    _attach_thumbs(store, out_dir, shown, cfg, job_info)
    html_path = out_dir / "index.html"
    atomic_write_bytes(html_path, review_html.render_page(job_info, summary, shown).encode("utf-8"))
    manifest = {"job": job_info, "counts": summary["by_status"], "total": summary["total"],
                "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(), "files": ["results.csv", "results.jsonl", "index.html", THUMBS + "/"]}
    atomic_write_bytes(out_dir / "manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return {"csv": csv_path, "jsonl": jsonl_path, "html": html_path, "manifest": out_dir / "manifest.json"}


def _attach_thumbs(store: Store, out_dir: Path, rows: list[dict], cfg: ReviewConfig, job_info: dict) -> None:
    """Set `thumb` on each shown row and its neighbours; make the missing ones (cached as files)."""
    thumbs = out_dir / THUMBS
    review = job_info["settings"].get("review", {})
    preset, dpi = review.get("preset", "clean"), int(review.get("dpi") or 100)
    for row in rows:
        name = f"chart-{row['id']}.jpg"
        if not (thumbs / name).exists() and "embed" in row["timings"]:  # it loaded once: draw it again
            meta = case_meta(store, [row["chart"]]).get(row["chart"], {})
            try:
                page = open_chart(chart_kind(row["chart"]), row["path"], meta, preset, dpi, row["chart"])
                write_thumb(out_dir, name, jpeg_bytes(page, cfg.thumb_width))
            except Exception:  # the file moved since it was reviewed: the row shows no picture
                pass
        row["thumb"] = f"{THUMBS}/{name}" if (thumbs / name).exists() else None
    need = {int(n["case_id"]): n for row in rows for n in row["neighbours"]}
    missing = [cid for cid in need if not (thumbs / f"case-{cid}.jpg").exists()]
    by_id: dict[int, Case] = {}
    if missing and any(not (need[c].get("image_path") and Path(need[c]["image_path"]).exists()) for c in missing):
        with store.session() as s:
            by_id = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(missing)))}
    for cid in missing:
        try:
            src = need[cid].get("image_path")
            if src and Path(src).exists():
                from PIL import Image as PILImage

                with PILImage.open(src) as im:
                    data = jpeg_bytes(im, cfg.thumb_width)
            elif cid in by_id:
                from rag_ecg.paper.render import render_page
                from rag_ecg.data.store import load_case_record

                data = jpeg_bytes(render_page(load_case_record(by_id[cid]), preset="clean", seed=0, dpi=dpi),
                                  cfg.thumb_width)
            else:
                continue
            write_thumb(out_dir, f"case-{cid}.jpg", data)
        except Exception:  # an unreadable reference page: that neighbour shows no picture
            continue
    for row in rows:
        for n in row["neighbours"]:
            name = f"case-{int(n['case_id'])}.jpg"
            n["thumb"] = f"{THUMBS}/{name}" if (thumbs / name).exists() else None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"rag_ecg": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "open_clip_torch", "faiss-cpu", "sqlalchemy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _tmp_beside(path: Path) -> tuple[str, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp, path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace: readers never see half a file."""
    tmp, path = _tmp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
