"""The batch review page: one self-contained `index.html` (inline CSS/JS/SVG, no network).

Why this shape: a reviewer opens the page from a shared folder or a laptop with no internet; everything
but the thumbnails (small JPEGs under `thumbs/`, relative links) is inline. The summary shows counts by
status and by superclass and a histogram of confidence as inline SVG; the table sorts on a header click
(plain JS; `#sort=<column>[:desc]` in the URL sorts on load) and filters on typed text. After load a tiny
script marks each <img> with `data-loaded="1"` when it decoded (naturalWidth > 0), so a headless browser
can check the page.
"""
from __future__ import annotations

import html
import json
from typing import Sequence

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.reader.report import NOTICE
from rag_ecg.review.config import STATUSES

EAGER_ROWS = 60  # rows whose pictures load at once; later rows load lazily as they scroll into view

COLUMNS = (  # (key, header, sort type)
    ("id", "#", "num"), ("chart", "Chart", "text"), ("status", "Status", "text"),
    ("measured", "Measured (rate, axis, intervals)", "num"), ("top", "Top diagnosis", "text"), ("confidence", "Confidence", "num"), ("diagnoses", "Diagnoses", "text"),
    ("report", "Report", "text"), ("neighbours", "Similar cases", "num"), ("time", "Time (s)", "num"),
)

CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#d9e2ec;--done:#1f7a4d;--error:#b42318;--pending:#8a6d00;--bar:#3e7cb1;
--unparsed:#8e3b8c}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
margin:0;padding:20px 28px;background:#fbfcfd}h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
.meta{color:var(--muted);font-size:12px;margin-bottom:14px;word-break:break-all}.notice{color:var(--muted);font-size:12px}
.summary{display:flex;flex-wrap:wrap;gap:18px;margin:12px 0 18px}.card{background:#fff;border:1px solid var(--line);
border-radius:8px;padding:12px 14px}.counts{display:flex;gap:14px}.count b{display:block;font-size:24px}
.count.done b{color:var(--done)}.count.error b{color:var(--error)}.count.pending b{color:var(--pending)}
.count.unparsed b{color:var(--unparsed)}.badge.unparsed{background:var(--unparsed)}.dropped{color:var(--error)}
pre.raw{white-space:pre-wrap;word-break:break-word;max-height:16em;overflow:auto;font-size:12px;margin:4px 0}
svg text{font:11px system-ui,sans-serif;fill:var(--ink)}.tools{margin:8px 0}.tools input{padding:5px 8px;width:280px;
border:1px solid var(--line);border-radius:6px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid var(--line);padding:6px 8px;vertical-align:top;text-align:left}
th{position:sticky;top:0;background:#f0f4f8;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.chart img{width:240px;border:1px solid var(--line);display:block}.key{font-size:12px;color:var(--muted);
word-break:break-all;max-width:240px}.badge{border-radius:10px;padding:1px 8px;font-size:12px;color:#fff}
.badge.done{background:var(--done)}.badge.error{background:var(--error)}.badge.pending{background:var(--pending)}
.err{color:var(--error);max-width:380px;word-break:break-word}.nb{display:flex;flex-wrap:wrap;gap:6px;min-width:412px;
max-width:520px}.nb figure{margin:0;width:98px}.nb img{width:98px;border:1px solid var(--line);display:block}
.nb figcaption{font-size:11px;color:var(--muted)}.nothumb{width:98px;height:70px;border:1px dashed var(--line);
color:var(--muted);font-size:11px;display:flex;align-items:center;justify-content:center}
td.chart .nothumb{width:240px;height:48px}ul.dx{margin:0;padding-left:16px}details summary{cursor:pointer}
.report{min-width:260px;max-width:420px}.measured{min-width:190px;max-width:260px;font-size:13px}
.urgent{background:var(--error);color:#fff;font-weight:700;border-radius:4px;padding:2px 6px;display:inline-block;
margin-bottom:4px}.card.urgent{display:block;border-color:var(--error);font-size:15px}.mx{color:var(--muted)}
"""

JS = """
(function(){
  var table=document.getElementById('results'), body=table.tBodies[0];
  function val(tr,i,type){var td=tr.cells[i], v=td.getAttribute('data-sort'); if(v===null){v=td.textContent.trim();}
    if(type==='num'){var n=parseFloat(v); return isNaN(n)?-Infinity:n;} return v.toLowerCase();}
  function sortBy(i,desc){
    var th=table.tHead.rows[0].cells[i], type=th.getAttribute('data-type');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=val(a,i,type), y=val(b,i,type); var c=x<y?-1:(x>y?1:0);
      if(c===0){c=(+a.getAttribute('data-id'))-(+b.getAttribute('data-id'));} return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',desc?'descending':'ascending');
    table.setAttribute('data-sorted',th.getAttribute('data-key')+(desc?':desc':''));
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){sortBy(i,th.getAttribute('aria-sort')==='ascending');});});
  var m=/(?:^#|&)sort=([a-z]+)(:desc)?/.exec(location.hash||'');
  if(m){Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(th.getAttribute('data-key')===m[1]){sortBy(i,!!m[2]);}});}
  var filter=document.getElementById('filter');
  filter.addEventListener('input',function(){var q=filter.value.toLowerCase();
    Array.prototype.forEach.call(body.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});});
  function mark(){var ok=0; Array.prototype.forEach.call(document.images,function(img){
      var good=img.complete&&img.naturalWidth>0; img.setAttribute('data-loaded',good?'1':'0'); if(good){ok++;}});
    document.body.setAttribute('data-images',document.images.length);
    document.body.setAttribute('data-images-loaded',ok); document.body.setAttribute('data-ready','1');}
  if(document.readyState==='complete'){mark();}else{window.addEventListener('load',mark);}
})();
"""


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


def _img(src: str | None, alt: str, lazy: bool) -> str:
    if not src:
        return '<div class="nothumb">no image</div>'
    return f'<img src="{_e(src)}" alt="{_e(alt)}"{" loading=lazy" if lazy else ""}>'


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


def _row_html(row: dict, lazy: bool) -> str:
    status = row["status"]
    diags = row.get("diagnoses") or []
    dx = "".join(f'<li>{_e(d.get("superclass") if d.get("code") is None else d.get("code"))} — {_e(d["label"])} '
                 f'<b>{d["confidence"]:.2f}</b>{_cites(d.get("cited"))}</li>' for d in diags)
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
    nb_html = "".join(
        f'<figure>{_img(n.get("thumb"), "case " + str(n["case_id"]), lazy)}<figcaption>case {int(n["case_id"])} · '
        f'{float(n["score"]):.3f}<br>{_e(" ".join(n.get("labels") or []) or "—")}</figcaption></figure>'
        for n in nbs)
    top_score = max((float(n["score"]) for n in nbs), default=None)
    t = (row.get("timings") or {}).get("total")
    return (
        f'<tr class="chart-row" data-id="{int(row["id"])}" data-status="{_e(status)}">'
        f'<td data-sort="{int(row["id"])}">{int(row["id"])}</td>'
        f'<td class="chart" data-sort="{_e(row["chart"])}">{_img(row.get("thumb"), row["chart"], lazy)}'
        f'<div class="key">{_e(row["chart"])}</div></td>'
        f'<td data-sort="{_e(status)}"><span class="badge {_e(status)}">{_e(status)}</span></td>'
        f'<td class="measured" data-sort="{_fmt(row.get("heart_rate_bpm"), 0)}">{_measured_html(row)}</td>'
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
    head = "".join(f'<th data-key="{k}" data-type="{t}">{_e(h)}</th>' for k, h, t in COLUMNS)
    body = "".join(_row_html(r, lazy=i >= EAGER_ROWS) for i, r in enumerate(rows))
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
        "<div class='tools'><input id='filter' type='search' placeholder='filter rows (text)'></div>"
        f"<table id='results' data-total='{total}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<script type='application/json' id='summary-data'>{data}</script>"
        f"<script>{JS}</script></body></html>")
