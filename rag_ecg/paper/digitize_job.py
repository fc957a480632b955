"""The `digitize` command's job: pictures in, per picture a WFDB record in mV, a JSON account and an overlay out.

Why a job module: a batch of pictures is where unreadable files turn up. Each picture is read on its own; one
that cannot be read (not a picture, no ECG traces on it, a bug) costs one line naming the file and why, and the
batch goes on. A picture whose outputs are all there is skipped (its JSON is written last, so a killed run redoes
only the picture it was on): rerunning a batch resumes it; `force` reads everything again. Each page of a
multi-page PDF (a cart's export: often one ECG a page) is a picture of its own, written as `<stem>-p<N>.*`; a
1-page PDF keeps `<stem>.*`, and pages past MAX_PDF_PAGES cost one failure line instead of an endless batch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rag_ecg.data.images import (IMAGE_SUFFIXES, MAX_PDF_PAGES, ImageLoadError, load_image, page_name,
                                  pdf_page_count)
from rag_ecg.errors import InputError, RagEcgError
from rag_ecg.paper.calibration import calibrate, trace_ink
from rag_ecg.paper.digitize import METHODS, digitize, working_page
from rag_ecg.paper.export import outputs_exist, read_quality, safe_stem, write_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Picture:
    """One picture of a batch: a file, or page `page` (0-based) of a multi-page PDF."""

    path: Path
    page: int | None = None  # None: the file's only picture
    error: str | None = None  # set: not read, this line says why (the pages of a PDF past MAX_PDF_PAGES)

    @property
    def name(self) -> str:
        """What lines call it: the path, `x.pdf#page=N` for a page."""
        return str(self.path) if self.page is None else page_name(str(self.path), self.page)


@dataclass
class PictureResult:
    """What happened to one picture: "read", "skipped" (outputs already there) or "failed" (with why)."""

    path: Path
    stem: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    page: int | None = None  # 0-based page of a multi-page PDF


@dataclass
class DigitizeSummary:
    """Counts of a batch and the failures' one-line reasons."""

    out_dir: Path
    read: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        total = self.read + self.skipped + len(self.failed)
        per = f", {self.seconds / self.read:.2f} s per picture" if self.read else ""
        return (f"{total} picture{'' if total == 1 else 's'}: {self.read} read, {self.skipped} skipped (outputs exist), {len(self.failed)} "
                f"failed{per}; outputs in {self.out_dir}")


def list_pictures(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: the loader says what is wrong with one), folders walked recursively
    for picture files (IMAGE_SUFFIXES: PNG, JPEG, BMP, TIFF, WebP, GIF, HEIC/HEIF, PDF), in name order. A path
    that does not exist stays in the list: its failure line says so."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            out.extend(found)
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def pictures_of(paths: Sequence[Path]) -> list[Picture]:
    """Each file as one picture, a `.pdf` of N > 1 pages as N (at most MAX_PDF_PAGES, then one failing picture
    naming the rest). A PDF that cannot be counted stays one picture: reading it says what is wrong."""
    out: list[Picture] = []
    for p in paths:
        try:
            n = pdf_page_count(p) if p.suffix.lower() == ".pdf" else 1
        except ImageLoadError:
            n = 1
        if n <= 1:
            out.append(Picture(p))
            continue
        out.extend(Picture(p, k) for k in range(min(n, MAX_PDF_PAGES)))
        if n > MAX_PDF_PAGES:
            out.append(Picture(p, MAX_PDF_PAGES, f"{p}: pages {MAX_PDF_PAGES + 1}-{n} not read (a PDF is read up "
                                                 f"to {MAX_PDF_PAGES} pages; this one has {n}: split it)"))
    return out


def stems_for(pictures: Sequence[Path | Picture]) -> list[str]:
    """One output name per picture: its stem made WFDB-safe (`-p<N>` added for page N of a PDF); pictures
    sharing a stem (a.png, a.jpg) get their suffix added, then a number, so no two pictures of a batch write
    the same files."""
    pics = [q if isinstance(q, Picture) else Picture(q) for q in pictures]
    stems, taken = [], set()
    base = [safe_stem(q.path.stem) for q in pics]
    counts = {b: len({q.path for q, c in zip(pics, base) if c == b}) for b in base}
    for q, b in zip(pics, base):
        stem = b if counts[b] == 1 else safe_stem(f"{b}_{q.path.suffix.lstrip('.')}")
        stem = stem if q.page is None else f"{stem}-p{q.page + 1}"
        k, cand = 2, stem
        while cand in taken:
            cand, k = f"{stem}_{k}", k + 1
        taken.add(cand)
        stems.append(cand)
    return stems


def digitize_picture(path: Path, out_dir: Path, stem: str, speed_mm_s: float = 25.0,
                     gain_mm_mv: float | None = None, method: str = "auto", page: int | None = None) -> dict:
    """Read one picture (page `page` of a PDF) and write its outputs; returns its JSON. Raises RagEcgError when
    it cannot be read."""
    start = time.perf_counter()
    picture = np.asarray(load_image(path, page=page or 0))
    read = digitize(picture, method=method)
    work = working_page(picture, read)
    ink = trace_ink(work)
    cal = calibrate(work, read, speed_mm_s=speed_mm_s, gain_mm_mv=gain_mm_mv, ink=ink)
    quality = read_quality(read, ink)
    source = str(path) if page is None else page_name(str(path), page)
    return write_outputs(out_dir, stem, picture, read, cal, quality, source=source,
                         extra={"method": read.method, "seconds": round(time.perf_counter() - start, 3)})


def iter_digitize(paths: Sequence[Path | Picture], out_dir: str | Path, speed_mm_s: float = 25.0,
                  gain_mm_mv: float | None = None, force: bool = False,
                  method: str = "auto") -> Iterator[PictureResult]:
    """Each picture's result as it is done (see `digitize_picture`); failures are results, not exceptions.
    Paths are taken as `pictures_of` them (a multi-page PDF: its pages)."""
    out_dir = Path(out_dir)
    pics = [x for q in paths for x in ([q] if isinstance(q, Picture) else pictures_of([q]))]
    for pic, stem in zip(pics, stems_for(pics)):
        path, page = pic.path, pic.page
        if pic.error:
            yield PictureResult(path, stem, "failed", pic.error, page=page)
            continue
        if not force and outputs_exist(out_dir, stem):
            yield PictureResult(path, stem, "skipped", page=page)
            continue
        start = time.perf_counter()
        try:
            digitize_picture(path, out_dir, stem, speed_mm_s, gain_mm_mv, method, page)
        except (RagEcgError, OSError) as exc:
            yield PictureResult(path, stem, "failed", _one_line(pic.name, exc), page=page)
            continue
        except Exception as exc:  # a bug on one picture must not cost the batch; --verbose shows the traceback
            log.debug("unexpected error on %s", pic.name, exc_info=exc)
            yield PictureResult(path, stem, "failed", _one_line(pic.name, exc, f"internal error {type(exc).__name__}"),
                                page=page)
            continue
        yield PictureResult(path, stem, "read", seconds=time.perf_counter() - start, page=page)


def run_batch(inputs: Sequence[str | Path], out_dir: str | Path, speed_mm_s: float = 25.0,
              gain_mm_mv: float | None = None, force: bool = False, console: Console | None = None,
              report: Callable[[str], None] | None = None, method: str = "auto") -> DigitizeSummary:
    """`iter_digitize` over the pictures of `inputs`, with a progress bar on `console` (none if None); each
    failure's line goes to `report` as it happens. Raises InputError when the inputs hold no picture at all."""
    if method not in METHODS:
        raise InputError(f"digitize method {method!r} is not one of {', '.join(METHODS)}")
    if not 1.0 <= speed_mm_s <= 100.0:
        raise InputError(f"paper speed {speed_mm_s} mm/s is outside 1-100 mm/s")
    if gain_mm_mv is not None and not 0.5 <= gain_mm_mv <= 100.0:
        raise InputError(f"gain {gain_mm_mv} mm/mV is outside 0.5-100 mm/mV")
    paths = list_pictures(inputs)
    if not paths:
        raise InputError(f"no pictures found in {', '.join(str(i) for i in inputs)} "
                         f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    pics = pictures_of(paths)
    summary = DigitizeSummary(Path(out_dir))
    bar = Progress(TextColumn("digitize"), BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                   disable=console is None, transient=False)
    with bar:
        task = bar.add_task("digitize", total=len(pics), failed=0)
        for res in iter_digitize(pics, out_dir, speed_mm_s, gain_mm_mv, force, method):
            if res.status == "read":
                summary.read += 1
                summary.seconds += res.seconds
            elif res.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed.append(res.detail)
                if report is not None:
                    report(res.detail)
            bar.update(task, advance=1, failed=len(summary.failed))
    return summary


def _one_line(name: str, exc: BaseException, prefix: str = "") -> str:
    """`<file>: why` (`<file>#page=N: why` for a page of a PDF), on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{prefix}: {text}" if prefix else text
    if Path(name).name not in text:
        text = f"{name}: {text}"
    return text if len(text) <= 300 else text[:299] + "…"
