"""A report for people: plain text for a terminal or chart note, a self-contained HTML page, or a file.

Measurements of the tracing and the findings that follow from them by rule are shown apart from the
neighbours' votes and citations, each marked "measured"; an urgent one (ST elevation meeting the STEMI
criteria) comes first, above everything else. HTML pages carry their images inside them (base64 PNG thumbnails) and escape every text, so a page can be
mailed or archived on its own and no store text can inject markup. Given the retrieved neighbours, each case is
listed with its SCP statements in English and its own report quoted beside them (PTB-XL's reports are mostly
German, their mangled umlauts repaired), and its similarity rank among the library's own pairs when known.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from rag_ecg.data.images import load_image, to_rgb
from rag_ecg.data.labels import english_statements
from rag_ecg.data.text_repair import repair_report
from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write
from rag_ecg.reader.measured import FIELD_KEYS, not_measurable, summary_line
from rag_ecg.reader.report import Diagnosis, Report
from rag_ecg.search.evidence import Neighbour, similarity_text


def _cites(ids: list[int]) -> str:
    return f" [case{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}]" if ids else ""


def _fmt_num(v: float | None, unit: str) -> str:
    return "not estimated" if v is None else f"{v:g} {unit}"


def _field(r: Report, name: str, value: float | str | None, unit: str = "") -> str:
    """A rate/axis/interval field: its value marked "(measured)" when it came from the measurements; when
    the tracing was measured but this value could not be, why."""
    if value is None:
        return not_measurable(r.measurements, FIELD_KEYS[name]) if r.measurements else "not estimated"
    text = f"{value:g} {unit}" if isinstance(value, (int, float)) else str(value)
    return f"{text} (measured)" if name in r.measured_fields else text


def _intervals(r: Report) -> str:
    iv = r.intervals
    return (f"PR {_field(r, 'pr_ms', iv.pr_ms, 'ms')}; QRS {_field(r, 'qrs_ms', iv.qrs_ms, 'ms')}; "
            f"QT {_field(r, 'qt_ms', iv.qt_ms, 'ms')}; "
            f"QTc {_field(r, 'qtc_ms', iv.qtc_ms, 'ms (Bazett)' if 'qtc_ms' in r.measured_fields else 'ms')}")


def _diag_name(d: Diagnosis) -> str:
    tag = " / ".join(x for x in (d.superclass, d.code) if x)
    return f"{d.label} ({tag})" if tag and tag != d.label else d.label


def _confidence(d: Diagnosis) -> str:
    """"confidence 0.83", or for a statement a measurement made, "measured (confidence 0.50)"."""
    return f"measured (confidence {d.confidence:.2f})" if d.basis == "measured" else f"confidence {d.confidence:.2f}"


def case_findings(n: Neighbour) -> list[str]:
    """A neighbour's statements in English, e.g. "normal ECG (NORM 100)", most likely first."""
    return [f"{text} ({code}{f' {lik:g}' if lik else ''})"
            for code, text, lik in english_statements(n.codes, n.code_descriptions)]


def render_text(r: Report, neighbours: Sequence[Neighbour] | None = None) -> str:
    """Plain text for a terminal or a chart note (`neighbours`: the retrieved cases' findings and reports)."""
    out = [f"ECG interpretation — backend {r.backend or '?'}, model {r.model or '-'}",
           r.notice.upper(), ""]
    out += [f"*** {f.text} ***" for f in r.measured_findings if f.urgent]  # first: urgent, whatever the reader said
    if not r.parsed:
        out += [f"The reader's answer could not be parsed ({r.parse_error}). Raw answer:", "",
                r.raw_text or "", ""]
    else:
        out.append(f"Rhythm: {r.rhythm.text + _cites(r.rhythm.cited) if r.rhythm else 'not determined'}")
        out.append(f"Rate: {_field(r, 'rate_bpm', r.rate_bpm, 'bpm')}")
        out.append(f"Axis: {_field(r, 'axis', r.axis)}")
        out.append(f"Intervals: {_intervals(r)}")
        if r.measurements is not None:
            out.append(f"Measured from the tracing (not the similar cases' votes): {summary_line(r.measurements)}")
            out.append("Measured findings (rule-based):" + ("" if r.measured_findings else " none"))
            out += [f"  - {f.text}" for f in r.measured_findings]
        out.append(("Findings (similar cases):" if r.measurements is not None else "Findings:")
                   + ("" if r.findings else " none stated"))
        out += [f"  - {f.text}{_cites(f.cited)}" for f in r.findings]
        out.append("Diagnoses:" + ("" if r.diagnoses else " none above threshold"))
        out += [f"  - {_diag_name(d)}: {_confidence(d)}{_cites(d.cited)}" for d in r.diagnoses]
        out.append(f"Impression: {r.impression.text + _cites(r.impression.cited) if r.impression else '-'}")
    if r.dropped_citations:
        out += ["", "Removed by the citation check (cited cases that were not retrieved):"]
        out += [f"  - {d.where}: {d.text!r} cited unknown case(s) {', '.join(map(str, d.unknown))}"
                for d in r.dropped_citations]
    out += ["", *(f"Note: {n}" for n in r.notes)] if r.notes else []
    ret = r.retrieval
    out += ["", f"Retrieval: k={ret.k}, index {ret.index_name or '-'}, encoder {ret.encoder_hash or '-'}"]
    by_id = {n.case_id: n for n in neighbours or []}
    for c in ret.cases:
        n = by_id.get(c.case_id)
        pct = n.similarity_pct if n is not None else None
        out.append(f"  case {c.case_id}: {c.source} {c.external_id}, similarity {similarity_text(c.score, pct)}")
        if n is not None:
            out.append(f"    findings: {'; '.join(case_findings(n)) or 'none stated'}")
            if n.report:
                out.append(f'    report (original): "{repair_report(n.report)}"')
    return "\n".join(out) + "\n"


def thumbnail_data_url(image: str | Path | Image.Image, max_side: int = 480) -> str:
    """A PNG thumbnail as a `data:` URL, so an HTML page carries its images inside it."""
    img = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
    img = img.copy() if img is image else img  # thumbnail() works in place: never on the caller's picture
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(image, alt: str, max_side: int) -> str:
    try:
        url = thumbnail_data_url(image, max_side)
    except Exception as exc:  # a missing or unreadable file must not lose the whole report
        return f'<p class="missing">image unavailable: {html.escape(str(alt))} ({html.escape(type(exc).__name__)})</p>'
    return f'<img src="{url}" alt="{html.escape(alt, quote=True)}">'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
.notice{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;font-weight:600}
.cites{color:#555;font-size:.9em}.dropped{background:#fde8e8;padding:.5em 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.cases{display:flex;flex-wrap:wrap;gap:1em}.cases figure{margin:0;max-width:260px}
img{max-width:100%;border:1px solid #ccc}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}
.missing{color:#a00}.urgent{background:#b42318;color:#fff;padding:.5em 1em;font-weight:700}
.measured{border-left:4px solid #3e7cb1;padding-left:1em}ul.en{margin:0;padding-left:1.1em}
blockquote.orig{margin:0;padding-left:.6em;border-left:3px solid #ccc;font-style:italic}"""


def render_html(report: Report, query_image=None, case_images: dict[int, str | Path] | None = None,
                neighbours: Sequence[Neighbour] | None = None) -> str:
    """A self-contained page: images as base64 thumbnails, every text escaped (`neighbours`: the retrieved
    cases, shown with their findings in English and their quoted reports)."""
    e = html.escape
    r = report

    def cites(ids: list[int]) -> str:
        return f' <span class="cites">{e(_cites(ids).strip())}</span>' if ids else ""

    body = [f'<h1>ECG interpretation</h1><p class="notice">{e(r.notice)}</p>',
            f"<p>Backend <b>{e(r.backend or '?')}</b>, model <b>{e(r.model or '-')}</b></p>"]
    body += [f'<p class="urgent">{e(f.text)}</p>' for f in r.measured_findings if f.urgent]
    if query_image is not None:
        body.append(f"<h2>Query ECG</h2>{_img_tag(query_image, 'query ECG', 900)}")
    if not r.parsed:
        body.append(f"<h2>Unparsed answer</h2><p>{e(r.parse_error or '')}</p><pre>{e(r.raw_text or '')}</pre>")
    else:
        rows = [("Rhythm", (e(r.rhythm.text) + cites(r.rhythm.cited)) if r.rhythm else "not determined"),
                ("Rate", e(_field(r, "rate_bpm", r.rate_bpm, "bpm"))), ("Axis", e(_field(r, "axis", r.axis))),
                ("Intervals", e(_intervals(r)))]
        body.append("<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")
        if r.measurements is not None:
            body.append('<section class="measured"><h2>Measured from the tracing</h2><p>'
                        + e(summary_line(r.measurements)) + "</p><p>Rule-based findings (measured, not voted):</p>"
                        "<ul>" + "".join(f'<li class="{"urgent" if f.urgent else "finding"}" data-code="{e(f.code)}">'
                                         f"{e(f.text)}</li>" for f in r.measured_findings)
                        + "</ul>" + ("" if r.measured_findings else "<p>none</p>") + "</section>")
        heading = "Findings (similar cases)" if r.measurements is not None else "Findings"
        body.append(f"<h2>{heading}</h2><ul>" + "".join(f"<li>{e(f.text)}{cites(f.cited)}</li>" for f in r.findings)
                    + "</ul>" + ("" if r.findings else "<p>none stated</p>"))
        body.append("<h2>Diagnoses</h2><table><tr><th>Diagnosis</th><th>Confidence</th><th>Cited</th></tr>"
                    + "".join(f"<tr><td>{e(_diag_name(d))}</td><td>{d.confidence:.2f}"
                              f"{' (measured)' if d.basis == 'measured' else ''}</td>"
                              f"<td>{e(', '.join(map(str, d.cited)))}</td></tr>" for d in r.diagnoses)
                    + "</table>")
        if r.impression:
            body.append(f"<h2>Impression</h2><p>{e(r.impression.text)}{cites(r.impression.cited)}</p>")
    if r.dropped_citations:
        body.append('<div class="dropped"><h2>Removed by the citation check</h2><ul>' + "".join(
            f"<li>{e(d.where)}: {e(d.text)} — unknown case(s) {e(', '.join(map(str, d.unknown)))}</li>"
            for d in r.dropped_citations) + "</ul></div>")
    if r.notes:
        body.append('<div class="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{e(n)}</li>" for n in r.notes)
                    + "</ul></div>")
    ret = r.retrieval
    cited = set(r.cited_case_ids)
    by_id = {n.case_id: n for n in neighbours or []}

    def case_cells(cid: int) -> str:
        n = by_id.get(cid)
        if n is None:
            return ""
        found = "".join(f"<li>{e(f)}</li>" for f in case_findings(n))
        quote = f'<blockquote class="orig">{e(repair_report(n.report))}</blockquote>' if n.report else ""
        return f'<td><ul class="en">{found}</ul></td><td>{quote}</td>'

    extra = "<th>Findings (English)</th><th>Report (original)</th>" if by_id else ""
    body.append(f"<h2>Retrieved cases</h2><p>k={ret.k}, index {e(ret.index_name or '-')}, "
                f"encoder {e(ret.encoder_hash or '-')}</p><table><tr><th>Case</th><th>Source</th>"
                f"<th>Similarity</th><th>Cited</th>{extra}</tr>" + "".join(
                    f"<tr><td>{c.case_id}</td><td>{e(c.source)} {e(c.external_id)}</td>"
                    f"<td>{e(similarity_text(c.score, by_id[c.case_id].similarity_pct if c.case_id in by_id else None))}"
                    f"</td><td>{'yes' if c.case_id in cited else ''}</td>{case_cells(c.case_id)}</tr>"
                    for c in ret.cases) + "</table>")
    paths = {c.case_id: c.image_path for c in ret.cases if c.image_path}
    paths.update(case_images or {})
    figs = [f"<figure>{_img_tag(paths[cid], f'case {cid}', 360)}<figcaption>case {cid}</figcaption></figure>"
            for cid in r.cited_case_ids if cid in paths]
    if figs:
        body.append('<h2>Cited cases</h2><div class="cases">' + "".join(figs) + "</div>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ECG interpretation</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def render_report(report: Report, fmt: str, **kwargs) -> str:
    """`fmt` is text | json | html (`kwargs` go to `render_html`: query_image, case_images, neighbours; text
    takes `neighbours` alone)."""
    if fmt == "text":
        return render_text(report, kwargs.get("neighbours"))
    if fmt == "json":
        return report.to_json()
    if fmt == "html":
        return render_html(report, **kwargs)
    raise InputError(f"report format {fmt!r}: expected text, json or html")


def save_report(report: Report, path: str | Path, fmt: str | None = None, **kwargs) -> Path:
    """Write atomically; the format follows the suffix (.txt/.json/.html) unless given."""
    path = Path(path)
    fmt = fmt or {".json": "json", ".html": "html", ".htm": "html"}.get(path.suffix.lower(), "text")
    atomic_write(path, render_report(report, fmt, **kwargs))
    return path
