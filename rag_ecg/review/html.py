"""The batch review page: one self-contained `index.html` per job (inline CSS/JS/SVG, no network).

Why this shape: a reviewer opens the page from a shared folder or a laptop with no internet; everything but the
pictures (JPEGs under `thumbs/`, relative links) is inline. The summary shows counts by status and by superclass
and a histogram of confidence as inline SVG; the table sorts and filters. It is a tool to review with: any
chart or neighbour opens full size (with the digitised traces a toggle away), each neighbour shows its findings
in English beside its quoted report, labelled inputs show the truth beside the prediction (mismatches marked),
a refused chart shows its picture and why, and each chart takes agree / disagree / a comment (kept in the
browser, exported as CSV for `cli.py review-import`; imported ones come back pre-filled). Every text is
escaped: chart names and report texts are data, never markup. CSS and script: `page_assets`.
"""
from __future__ import annotations

import html
import json
from typing import Sequence

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.reader.report import NOTICE
from rag_ecg.review.config import STATUSES
from rag_ecg.review.page_assets import CSS, JS
from rag_ecg.search.evidence import similarity_text

EAGER_ROWS = 60  # rows whose pictures load at once; later rows load lazily as they scroll into view

COLUMNS = (  # (key, header, sort type); "truth" only when some chart has labels
    ("id", "#", "num"), ("chart", "Chart", "text"), ("status", "Status", "text"), ("verdict", "Your verdict", "text"),
    ("measured", "Measured (rate, axis, intervals)", "num"), ("truth", "Truth vs prediction", "num"),
    ("top", "Top diagnosis", "text"), ("confidence", "Confidence", "num"), ("diagnoses", "Diagnoses", "text"),
    ("report", "Report", "text"), ("neighbours", "Similar cases", "num"), ("time", "Time (s)", "num"),
)

LIGHTBOX = ("<div id='lightbox' hidden role='dialog' aria-modal='true' aria-label='full-size picture'>"
            "<div class='lb-bar'><span id='lb-title'></span><button type='button' id='lb-overlay' hidden>"
            "Show the read traces</button><button type='button' id='lb-close'>Close ✕</button></div>"
            "<div class='lb-body'><div id='lb-info'></div></div></div>")


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: float | None, nd: int = 2) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def status_svg(counts: dict[str, int]) -> str:
    """Counts by status as big numbers (text; no chart needed for four values)."""
    items = "".join(f'<div class="count {_e(k)}"><b>{int(counts.get(k, 0))}</b>{_e(k)}</div>'
                    for k in STATUSES)
    total = sum(int(v) for v in counts.values())
    return f'<div class="counts">{items}<div class="count"><b>{total}</b>charts</div></div>'


def superclass_svg(by_superclass: dict[str, int], done: int, width: int = 320) -> str:
    """Horizontal bars: charts (of those done) with a diagnosis in each PTB-XL superclass."""
    labels = list(SUPERCLASSES) + sorted(set(by_superclass) - set(SUPERCLASSES))
    row_h, left, right = 22, 46, 44
    h = row_h * len(labels) + 6
    top = max([1, done] + list(by_superclass.values()))
    parts = [f'<svg id="superclass-chart" role="img" aria-label="charts by superclass" width="{width}" '
             f'height="{h}" viewBox="0 0 {width} {h}">']
    for i, lab in enumerate(labels):
        n = int(by_superclass.get(lab, 0))
        y = 3 + i * row_h
        w = (width - left - right) * n / top
        parts.append(f'<text x="0" y="{y + 14}">{_e(lab)}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="14" fill="#3e7cb1"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 14}">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(values: Sequence[float], bins: int = 10, width: int = 340, height: int = 150) -> str:
    """Histogram of confidences in [0, 1] (each chart's top diagnosis) as an inline SVG."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(float(v) * bins)))] += 1
    top = max(counts + [1])
    pad_l, pad_r, pad_b, pad_t = 28, 18, 22, 8
    bw = (width - pad_l - pad_r) / bins
    ph = height - pad_b - pad_t
    parts = [f'<svg id="confidence-histogram" role="img" aria-label="confidence histogram" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">',
             f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{width - pad_r}" y2="{pad_t + ph}" stroke="#9aa5b1"/>',
             f'<text x="0" y="{pad_t + 10}">{top}</text><text x="0" y="{pad_t + ph}">0</text>']
    for i, n in enumerate(counts):
        bh = ph * n / top
        x = pad_l + i * bw
        parts.append(f'<rect class="bin" data-count="{n}" x="{x + 1:.1f}" y="{pad_t + ph - bh:.1f}" '
                     f'width="{bw - 2:.1f}" height="{bh:.1f}" fill="#3e7cb1"><title>{i / bins:.1f}–'
                     f'{(i + 1) / bins:.1f}: {n}</title></rect>')
    for i in range(0, bins + 1, max(1, bins // 5)):
        parts.append(f'<text x="{pad_l + i * bw - 6:.1f}" y="{height - 6}">{i / bins:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _img(src: str | None, alt: str, lazy: bool, full: str | None = None, overlay: str | None = None,
         why: str = "no picture") -> str:
    """A picture that opens full size on a click (`data-full`; `data-overlay`: its read traces)."""
    if not src:
        return f'<div class="nothumb">{_e(why)}</div>'
    extra = f' data-overlay="{_e(overlay)}"' if overlay else ""
    return (f'<img class="zoom" src="{_e(src)}" data-full="{_e(full or src)}"{extra} data-title="{_e(alt)}" '
            f'alt="{_e(alt)}" title="click: full size"{" loading=lazy" if lazy else ""}>')


def _num(v, unit: str) -> str:
    return "not measurable" if v is None else f"{v:g} {unit}"


def _measured_html(row: dict) -> str:
    """The chart's measurements and rule-based findings (marked measured), an urgent STEMI flag on top."""
    if row.get("measure_error"):
        return f'<div class="mx">not measurable: {_e(row["measure_error"])}</div>'
    if row.get("heart_rate_bpm") is None and row.get("qrs_axis_deg") is None and row.get("qrs_ms") is None:
        return '<div class="mx">not measured</div>'
    parts = []
    if row.get("stemi_urgent"):
        parts.append(f'<div class="urgent" data-urgent="stemi">URGENT: STEMI criteria met in '
                     f'{_e(", ".join(row.get("stemi_criteria") or []))}</div>')
    ax = row.get("qrs_axis_deg")
    rr = row.get("rr_irregular")
    parts.append(f'<div>Rate {_e(_num(row.get("heart_rate_bpm"), "bpm"))}'
                 f'{"" if rr is None else (", irregular" if rr else ", regular")}; axis '
                 f'{_e("not measurable" if ax is None else f"{ax:+g}°")}</div>'
                 f'<div>PR {_e(_num(row.get("pr_ms"), "ms"))} · QRS {_e(_num(row.get("qrs_ms"), "ms"))}</div>'
                 f'<div>QT {_e(_num(row.get("qt_ms"), "ms"))} · QTc {_e(_num(row.get("qtc_bazett_ms"), "ms"))}</div>')
    found = [f for f in row.get("measured_findings") or [] if f]
    if found:
        parts.append('<ul class="dx">' + "".join(f"<li>{_e(f)}</li>" for f in found) + "</ul>")
    return "".join(parts)


def _similarity(n: dict) -> str:
    return similarity_text(float(n["score"]), n.get("similarity_pct"))


def _neighbour_html(n: dict, lazy: bool) -> str:
    """A neighbour: its picture (full size on a click), similarity, labels, findings in English, quoted report."""
    cid = int(n["case_id"])
    name = f"case {cid}" + (f" · {n.get('source')} {n.get('external_id')}" if n.get("source") else "")
    statements = n.get("statements") or []
    en = "".join(f'<li>{_e(text)} <span class="mx">({_e(code)}{f" {lik:g}" if lik else ""})</span></li>'
                 for code, text, lik in statements)
    report = n.get("report") or ""
    info = (f'<div class="info"><ul class="en">{en}</ul>' if en else '<div class="info">')
    if report:
        info += (f'<details><summary>original report</summary><blockquote class="orig">{_e(report)}</blockquote>'
                 "</details>")
    info += "</div>"
    return (f'<figure class="nbf" data-case="{cid}">{_img(n.get("thumb"), name, lazy, n.get("full"), why="no picture")}'
            f'<figcaption>case {cid} · <span class="sim">{_e(_similarity(n))}</span><br>'
            f'<b>{_e(" ".join(n.get("labels") or []) or "—")}</b>{info}</figcaption></figure>')


def _truth_html(row: dict) -> tuple[str, str]:
    """(cell, sort value): each superclass in the truth or the prediction, marked agreeing / missed / extra."""
    truth = row.get("truth")
    if truth is None:
        return '<span class="mx">no labels</span>', ""
    pred = set(row.get("predicted") or [])
    if row.get("status") != "done":
        return f'truth: {_e(" ".join(truth) or "none")}', ""
    marks = []
    for c in list(SUPERCLASSES) + sorted((set(truth) | pred) - set(SUPERCLASSES)):
        if c in truth and c in pred:
            marks.append(f'<li class="ok" data-mark="ok">{_e(c)} ✓</li>')
        elif c in truth:
            marks.append(f'<li class="miss" data-mark="missed">{_e(c)} missed</li>')
        elif c in pred:
            marks.append(f'<li class="extra" data-mark="extra">{_e(c)} not in truth</li>')
    match = set(truth) == pred
    head = "matches" if match else "mismatch"
    return (f'<div class="{"ok" if match else "miss"}">{head}</div><div class="mx">truth: '
            f'{_e(" ".join(truth) or "none")} · predicted: {_e(" ".join(sorted(pred)) or "none")}</div>'
            f'<ul class="dx">{"".join(marks)}</ul>'), "1" if match else "0"


def _verdict_html(row: dict) -> str:
    rid = int(row["id"])
    radios = "".join(f'<label><input type="radio" name="v-{rid}" value="{v}"> {v}</label>' for v in ("agree", "disagree"))
    return (f'<td class="verdict"><div>{radios}<button type="button" class="vclear">clear</button></div>'
            f'<textarea rows="2" placeholder="comment" aria-label="comment on chart {rid}"></textarea>'
            '<div class="vstate"></div></td>')


def _row_html(row: dict, lazy: bool, with_truth: bool) -> str:
    status = row["status"]
    diags = row.get("diagnoses") or []
    dx = "".join(f'<li>{_e(d.get("superclass") if d.get("code") is None else d.get("code"))} — {_e(d["label"])} '
                 f'<b>{d["confidence"]:.2f}</b>{" (measured)" if d.get("basis") == "measured" else ""}'
                 f'{_cites(d.get("cited"))}</li>' for d in diags)
    report_parts = []
    if row.get("error"):
        report_parts.append(f'<div class="err">{_e(row["error"])}</div>')
    if row.get("rhythm"):
        report_parts.append(f"<div><b>Rhythm:</b> {_e(row['rhythm'])}</div>")
    if row.get("impression"):
        report_parts.append(f"<details><summary>Impression</summary>{_e(row['impression'])}</details>")
    findings = [f for f in row.get("findings") or [] if f]
    if findings:
        report_parts.append("<details><summary>Findings</summary><ul>"
                            + "".join(f"<li>{_e(f)}</li>" for f in findings) + "</ul></details>")
    if row.get("raw_answer") is not None:
        report_parts.append(f'<details open class="raw"><summary>The reader\'s answer (not a report)</summary>'
                            f'<pre class="raw">{_e(row["raw_answer"])}</pre></details>')
    dropped = row.get("dropped_citations") or []
    if dropped:
        report_parts.append(
            f'<details class="dropped"><summary>{len(dropped)} statement(s) dropped: cited cases not retrieved'
            "</summary><ul>" + "".join(f'<li>{_e(d.get("where"))}: {_e(d.get("text"))} — case(s) '
                                       f'{_e(", ".join(str(c) for c in d.get("unknown") or []))}</li>'
                                       for d in dropped) + "</ul></details>")
    nbs = row.get("neighbours") or []
    nb_html = "".join(_neighbour_html(n, lazy) for n in nbs)
    top_score = max((float(n["score"]) for n in nbs), default=None)
    t = (row.get("timings") or {}).get("total")
    chart_img = _img(row.get("thumb"), row["chart"], lazy, row.get("full"), row.get("overlay"),
                     why="no picture")
    refused = (f'<div class="refused">refused: {_e(row["error"])}</div>'
               if status == "error" and row.get("thumb") and row.get("error") else "")
    toggle = ('<label class="ovl"><input type="checkbox" class="overlay-toggle"> show the read traces</label>'
              if row.get("overlay") and row.get("thumb") else "")
    v = row.get("verdict") or {}
    stored = (f' data-verdict="{_e(v.get("verdict"))}" data-comment="{_e(v.get("comment"))}"'
              f' data-stored-at="{_e(v.get("decided_at"))}"' if v else "")
    truth_cell = ""
    mismatch = ""
    if with_truth:
        cell, key = _truth_html(row)
        truth_cell = f'<td class="truth" data-sort="{key}">{cell}</td>'
        mismatch = " mismatch" if key == "0" else ""
    return (
        f'<tr class="chart-row{mismatch}" data-id="{int(row["id"])}" data-status="{_e(status)}" '
        f'data-chart="{_e(row["chart"])}"{stored}>'
        f'<td data-sort="{int(row["id"])}">{int(row["id"])}</td>'
        f'<td class="chart" data-sort="{_e(row["chart"])}"><figure class="chartfig" style="margin:0">{chart_img}'
        f'</figure><div class="key">{_e(row["chart"])}</div>{toggle}{refused}</td>'
        f'<td data-sort="{_e(status)}"><span class="badge {_e(status)}">{_e(status)}</span></td>'
        f'{_verdict_html(row)}'
        f'<td class="measured" data-sort="{_fmt(row.get("heart_rate_bpm"), 0)}">{_measured_html(row)}</td>'
        f'{truth_cell}'
        f'<td>{_e(row.get("top_diagnosis") or "")}</td>'
        f'<td data-sort="{_fmt(row.get("top_confidence"), 4)}">{_fmt(row.get("top_confidence"))}</td>'
        f'<td data-sort="{len(diags)}"><ul class="dx">{dx}</ul></td>'
        f'<td class="report">{"".join(report_parts)}</td>'
        f'<td data-sort="{_fmt(top_score, 4)}"><div class="nb">{nb_html}</div></td>'
        f'<td data-sort="{_fmt(t, 4)}">{_fmt(t, 3)}</td></tr>')


def _cites(ids) -> str:
    ids = list(ids or [])
    return f' <span class="key">[{_e(", ".join(str(i) for i in ids))}]</span>' if ids else ""


def render_page(job: dict, summary: dict, rows: Sequence[dict], title: str = "rag-ecg chart review") -> str:
    """The whole page. `job`: id, key, input, status, settings; `summary`: by_status, by_superclass,
    confidence (list of floats), total, urgent (charts meeting the STEMI criteria); `rows`: outputs rows with
    `thumb` / neighbours' `thumb` set."""
    settings = job.get("settings") or {}
    rv, idx = settings.get("review") or {}, settings.get("index") or {}
    by_status = summary.get("by_status") or {}
    total = int(summary.get("total", len(rows)))
    shown_note = (f"<p class='notice'>Showing the first {len(rows)} of {total} charts; all are in "
                  f"results.csv and results.jsonl.</p>" if len(rows) < total else "")
    meta = (f"input {_e(job.get('input'))} · job {_e(job.get('id'))} ({_e(str(job.get('key', ''))[:12])}) · "
            f"backend {_e(rv.get('backend'))} · k {_e(rv.get('k'))} · index {_e(idx.get('path'))} "
            f"({_e(idx.get('count'))} cases) · status {_e(job.get('status'))}")
    with_truth = any(r.get("truth") is not None for r in rows)
    cols = [c for c in COLUMNS if with_truth or c[0] != "truth"]
    head = "".join(f'<th data-key="{k}" data-type="{t}">{_e(h)}</th>' for k, h, t in cols)
    body = "".join(_row_html(r, i >= EAGER_ROWS, with_truth) for i, r in enumerate(rows))
    has_overlay = any(r.get("overlay") for r in rows)
    mismatches = sum(1 for r in rows if r.get("truth") is not None and r.get("status") == "done"
                     and set(r["truth"]) != set(r.get("predicted") or []))
    truth_note = (f"<div class='card' id='truth-summary'>{mismatches} of "
                  f"{sum(1 for r in rows if r.get('truth') is not None and r.get('status') == 'done')} labelled "
                  f"charts' superclasses differ from the truth (marked red)</div>" if with_truth else "")
    urgent = list(summary.get("urgent") or [])
    alarm = (f"<div class='card urgent' id='urgent'>URGENT: {len(urgent)} chart(s) with ST elevation meeting the "
             f"STEMI criteria (measured): {_e(', '.join(urgent[:20]))}{' …' if len(urgent) > 20 else ''}</div>"
             if urgent else "")
    data = json.dumps({"total": total, "by_status": by_status}, sort_keys=True).replace("</", "<\\/")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class='meta'>{meta}</div>{alarm}"
        "<section class='summary'>"
        f"<div class='card'><h2>Charts by status</h2>{status_svg(by_status)}</div>"
        f"<div class='card'><h2>Charts by superclass</h2>"
        f"{superclass_svg(summary.get('by_superclass') or {}, int(by_status.get('done', 0)))}</div>"
        f"<div class='card'><h2>Confidence of the top diagnosis</h2>"
        f"{histogram_svg(summary.get('confidence') or [])}</div></section>"
        f"<p class='notice'>{_e(NOTICE)}</p>{shown_note}"
        f"{truth_note}<div class='tools'><input id='filter' type='search' placeholder='filter rows (text)'>"
        + ("<label class='ovl'><input type='checkbox' id='overlay-all'> show the read traces on every chart</label>"
           if has_overlay else "")
        + "<button type='button' id='export-verdicts'>Export verdicts (CSV)</button><span id='verdict-tally' "
        "class='mx'></span><span class='mx'>click a picture for full size · verdicts stay in this browser until "
        "exported; <code>python cli.py review-import FILE.csv</code> stores them with the job</span></div>"
        f"<table id='results' data-total='{total}' data-job-key='{_e(job.get('key') or '')}' "
        f"data-job-id='{_e(job.get('id') or '')}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"{LIGHTBOX}<script type='application/json' id='summary-data'>{data}</script>"
        f"<script>{JS}</script></body></html>")
