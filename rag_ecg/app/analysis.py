"""One query through the whole pipeline for the web app: picture (or drawn WFDB record) -> digitised traces and
their overlay, measurements, nearest cases, grounded report, and the files a user downloads.

Why one `Analyzer` opened once: the encoder, the FAISS indexes and the reader backend take seconds to load and
are not meant to be shared between threads; the server runs every analysis on its one worker thread through
this object. Each step is the library's own (the loader, `digitize`, `calibrate`, `export`, `reader.tracing`,
`Retriever`, `interpret`, `report_render`), so a page and the CLI say the same about the same file: a picture is
read by the digitiser once, and that read feeds the overlay, the WFDB export, the measurements and the trace
encoder.
"""
from __future__ import annotations

import io
import logging
import secrets
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from rag_ecg import __version__
from rag_ecg.data.images import load_image, pdf_page_count
from rag_ecg.data.records import read_wfdb
from rag_ecg.data.store import open_store
from rag_ecg.io import json_text
from rag_ecg.paper.calibration import calibrate, to_millivolts, trace_ink
from rag_ecg.paper.digitize import Digitized, DigitizeError, digitize, working_page
from rag_ecg.paper.export import OUT_FS, describe, overlay, read_quality, safe_stem, write_wfdb
from rag_ecg.paper.render import render_page
from rag_ecg.reader.backends import get_backend
from rag_ecg.reader.interpret import interpret
from rag_ecg.reader.report import Report
from rag_ecg.reader.report_render import render_html
from rag_ecg.measure import measure_signal
from rag_ecg.reader.tracing import query_measurements, quietly, record_measurements
from rag_ecg.search.evidence import Evidence, Neighbour
from rag_ecg.search.retrieve import MANIFEST, IndexNotReadyError, Retriever
from rag_ecg.app.uploads import is_record

log = logging.getLogger(__name__)


@dataclass
class Result:
    """Everything the result page and its downloads show for one query (held in memory by the server)."""

    id: str
    name: str  # the file as the user named it
    kind: str  # "picture" | "record"
    overlay_png: bytes
    digitized: dict  # the digitiser's JSON account (layout, scales, quality), as `cli.py digitize` writes it
    measurements: dict  # `cli.py measure` JSON (+ sex); `error` set when the tracing could not be measured
    evidence: Evidence
    report: Report
    report_json: str
    query_page: Image.Image  # the picture (or drawn record) at most 900 px a side: the HTML report's query image
    record_zip: bytes  # <stem>.hea/.dat (WFDB, mV, 500 Hz) + <stem>.json
    stem: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    _html: str | None = None

    def neighbour(self, case_id: int) -> Neighbour | None:
        return next((n for n in self.evidence.neighbours if n.case_id == case_id), None)

    def report_html(self) -> str:
        """The report as `report --format html` writes it, pictures inside; made on first download (its
        thumbnails take half an analysis's time, and most users never download it)."""
        if self._html is None:
            pages = {n.case_id: n.image_path for n in self.evidence.neighbours if n.image_path}
            self._html = render_html(self.report, query_image=self.query_page, case_images=pages,
                                     neighbours=self.evidence.neighbours)
        return self._html


def no_index_line(index_dir: Path) -> str:
    """The one line a missing index gets, wherever it is noticed."""
    return (f"no index at {index_dir}: run `python cli.py quickstart` first (or `python cli.py build-index`), "
            f"or pass --index")


class Analyzer:
    """The loaded models and the query pipeline; use from one thread at a time (the server's worker)."""

    def __init__(self, retriever: Retriever, backend, k: int = 8, cot: bool = True, max_cases: int | None = None):
        self.retriever = retriever
        self.backend = backend
        self.k = k
        self.cot = cot
        self.max_cases = max_cases

    @classmethod
    def open(cls, index_dir: str | Path, db: str | None = None, backend: str = "retrieval",
             backend_options: dict | None = None, k: int = 8, cot: bool = True,
             max_cases: int | None = None) -> "Analyzer":
        """Open the index (and its encoder), the case store and the reader backend. Raises IndexNotReadyError
        with the quickstart line when there is no index yet."""
        index_dir = Path(index_dir)
        if not (index_dir / MANIFEST).is_file():
            raise IndexNotReadyError(no_index_line(index_dir))
        retriever = Retriever.open(index_dir, open_store(db))
        return cls(retriever, get_backend(backend, **(backend_options or {})), k=k, cot=cot, max_cases=max_cases)

    def describe(self) -> dict:
        """What the pages say about the running app: the reader, the index and its size."""
        m = self.retriever.manifest
        return {"backend": self.backend.name, "model": self.backend.model or "", "index": self.retriever.name,
                "index_dir": str(self.retriever.index_dir), "cases": int(m.get("count") or 0), "k": self.k,
                "rag_ecg": __version__}

    def close(self) -> None:
        self.backend.close()
        self.retriever.store.dispose()

    # ---- one query ---------------------------------------------------------------------------------------
    def analyze(self, query: Path, name: str, scratch: Path, sex: str | None = None,
                age: float | None = None) -> Result:
        """`query`: a picture/PDF file or a WFDB .hea, `name`: what the user called it, `scratch`: the request's
        own folder for the digitised record's files, `sex`/`age`: the patient's when the user gave them (the
        sex- and age-dependent thresholds; a record's header otherwise). Raises RagEcgError (one line naming the
        file) for what the CLI would refuse."""
        start = time.perf_counter()
        notes: list[str] = []
        if is_record(query):
            rec = read_wfdb(query, record_id=Path(name).stem)
            page = render_page(rec, preset="clean", dpi=int(self.retriever.manifest["build"]["dpi"]))
            notes.append("a WFDB record has no picture: it is drawn as a clean page, and that page is read")
            kind = "record"
        else:
            page = load_image(query)
            pages = pdf_page_count(query) if query.suffix.lower() == ".pdf" else 1
            if pages > 1:
                notes.append(f"{name} has {pages} pages: page 1 was read (use `cli.py review` for every page)")
            kind = "picture"
        arr = np.ascontiguousarray(np.asarray(page.convert("RGB")))
        try:
            read = digitize(arr)  # the not-an-ECG check; the same read serves everything below
        except DigitizeError as exc:  # as `cli.py report` says it: the file, then why
            raise DigitizeError(f"{name}: {exc}") from None
        work = working_page(arr, read)
        ink = trace_ink(work)
        cal = calibrate(work, read, ink=ink)
        mv = to_millivolts(read, cal, OUT_FS)
        digitized = describe(read, cal, read_quality(read, ink), arr.shape, mv, name)
        if kind == "record" and sex is None and age is None:  # its own signal, sex and age from its header
            measurements = quietly(name, lambda: record_measurements(query, name))
        elif kind == "record":
            measurements = query_measurements(query, sex, age)  # the given sex/age over the header's
        else:  # the page's signal on its own mm scale, as `cli.py measure` reads it (reader.tracing)
            measurements = quietly(name, lambda: {**measure_signal(mv, OUT_FS, sex, age, input_name=name).to_dict(),
                                                  "sex": sex})
        evidence = self._search(page, read)
        report = interpret(page, evidence, self.backend, cot=self.cot, max_cases=self.max_cases,
                           measurements=measurements)
        stem = safe_stem(Path(name).stem)
        small = page.copy()
        small.thumbnail((900, 900))
        return Result(
            id=secrets.token_urlsafe(12), name=name, kind=kind, overlay_png=_png(overlay(arr, read, cal)),
            digitized=digitized, measurements=measurements, evidence=evidence, report=report,
            report_json=report.to_json(), query_page=small,
            record_zip=_record_zip(scratch, stem, mv, digitized, name, read), stem=stem,
            seconds=round(time.perf_counter() - start, 2), notes=notes)

    def _search(self, page: Image.Image, read: Digitized) -> Evidence:
        encoder = self.retriever.encoder
        pre = encoder.preprocess
        if getattr(pre, "kind", "") == "trace":  # the trace tower reads the digitiser's traces: reuse the read
            emb = encoder.embed_pixels(pre.stack(read.signal, read.mask)[None])
        else:
            emb = encoder.embed_images([page])
        return self.retriever.search_embeddings(emb, self.k)[0]


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # a photo's overlay: ~0.4 s, not ~1 s
    return buf.getvalue()


def _record_zip(scratch: Path, stem: str, mv: np.ndarray, digitized: dict, name: str, read: Digitized) -> bytes:
    """The digitised record as `cli.py digitize` writes it (WFDB .hea/.dat in mV + the JSON), zipped."""
    folder = scratch / "digitized"
    write_wfdb(folder, stem, mv, OUT_FS, comments=[f"rag-ecg {__version__} web app: {name}",
                                                   f"layout {read.layout}, px/mm from the {digitized['px_per_mm_source']}"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for suffix in (".hea", ".dat"):
            z.write(folder / f"{stem}{suffix}", f"{stem}{suffix}")
        z.writestr(f"{stem}.json", json_text(digitized))
    return buf.getvalue()


def case_report_view(report: Report) -> Report:
    """The report as the result page embeds it: its case pages are shown by the page itself (served by
    route), so the embedded copy carries no base64 thumbnails of them."""
    cases = [replace(c, image_path=None) for c in report.retrieval.cases]
    return replace(report, retrieval=replace(report.retrieval, cases=cases))
