"""`interpret`: evidence + image -> grounded Report, through any backend; `report_command` for the CLI.

    report = interpret(image, evidence, get_backend("retrieval"))   # prompt -> generate -> parse -> retry -> cite-check

`measurements` (the tracing's own, `rag_ecg.reader.tracing`) go into the prompt as measured facts and onto the report
in their own fields, whichever backend reads.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from rag_ecg.data.images import load_image, to_rgb
from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write
from rag_ecg.reader.backends import get_backend
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.parse import ParseError, parse_answer
from rag_ecg.reader.token_budget import PromptTooLongError
from rag_ecg.reader.prompts import retry_messages
from rag_ecg.reader.measured import measured_findings, prompt_block
from rag_ecg.reader.report import Report, RetrievalInfo, check_citations, unparsed_report, with_measurements
from rag_ecg.reader.report_render import render_report
from rag_ecg.reader.tracing import query_measurements

if TYPE_CHECKING:
    from rag_ecg.search.evidence import Evidence


def _load_image(image: Image.Image | str | Path | None) -> Image.Image | None:
    """A picture file through the one loader (allowed formats, pixel cap, EXIF rotation, alpha on white)."""
    if image is None or isinstance(image, Image.Image):
        return None if image is None else to_rgb(image)  # a caller's RGBA page: transparent on white too
    return load_image(image)


def interpret(image: Image.Image | str | Path | None, evidence: "Evidence", backend: LLMBackend,
              retries: int = 1, cot: bool | None = None, max_cases: int | None = None,
              measurements: dict | None = None) -> Report:
    """The grounded report for one query image: a malformed answer is retried `retries` times with the
    parser's error, then kept as unparsed free text; citations to cases not retrieved are dropped.
    `cot`/`max_cases` shorten the prompt for small context windows (see prompts.build_messages; None: the
    backend's own settings), and a backend that knows its window fits the prompt into it (`backend.prepare`:
    lowest-ranked cases dropped, said in `report.notes`; citations are checked against the cases shown);
    `measurements` (Measurements.to_dict() + "sex") are the tracing's measured facts."""
    shown, notes = evidence, []
    if backend.composes_reports:
        report = backend.compose(evidence, measurements)
    else:
        img = _load_image(image)
        images = [img] if img is not None else []
        measured = prompt_block(measurements, measured_findings(measurements))
        fitted = backend.prepare(evidence, img, cot=backend.cot if cot is None else cot,
                                 max_cases=backend.max_cases if max_cases is None else max_cases, measured=measured)
        messages, shown, notes = fitted.messages, fitted.evidence, list(fitted.notes)
        answer = backend.generate(messages, images)
        for attempt in range(retries + 1):
            try:
                report = parse_answer(answer)
                break
            except ParseError as exc:
                if attempt == retries:
                    report = unparsed_report(answer, str(exc))
                    break
                messages = retry_messages(messages, answer, str(exc))
                try:
                    answer = backend.generate(messages, images)
                except PromptTooLongError as long_exc:  # the retry has no room left: keep the first answer
                    report = unparsed_report(answer, f"{exc}; no retry: {long_exc}")
                    break
        report = with_measurements(report, measurements)
    report = replace(report, backend=backend.name, model=backend.model,
                     retrieval=RetrievalInfo.from_evidence(evidence), notes=[*report.notes, *notes])
    return check_citations(report, shown)


def report_command(image_path: str | Path | None, evidence: "Evidence", backend: str = "retrieval",
                   fmt: str = "text", out: str | Path | None = None, retries: int = 1,
                   backend_options: dict | None = None, cot: bool | None = None, max_cases: int | None = None,
                   measure_from: str | Path | None = None, sex: str | None = None, age: float | None = None) -> str:
    """What `cli.py report` prints: interpret, render as text/json/html, optionally save atomically.
    `measure_from`: the picture or WFDB record whose tracing is measured for the report (None: not measured);
    `sex`/`age`: the patient's, for the sex- and age-dependent thresholds (STEMI in V2-V3, long QTc)."""
    if fmt not in ("text", "json", "html"):
        raise InputError(f"--format {fmt!r}: expected text, json or html")
    be = get_backend(backend, **(backend_options or {}))
    try:
        measurements = query_measurements(measure_from, sex, age) if measure_from is not None else None
        report = interpret(image_path, evidence, be, retries=retries, cot=cot, max_cases=max_cases,
                           measurements=measurements)
    finally:
        be.close()
    kwargs = {"query_image": image_path} if fmt == "html" and image_path is not None else {}
    kwargs["neighbours"] = evidence.neighbours  # each case's findings in English beside its quoted report
    rendered = render_report(report, fmt, **kwargs)
    if out is not None:
        atomic_write(Path(out), rendered)
    return rendered
