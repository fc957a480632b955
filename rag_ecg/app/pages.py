"""The web app's HTML: the start page (upload form, examples) and a result page (overlay, measurements, similar
cases, the grounded report, downloads). Server-rendered, no script, no outside assets.

Why no script and no CDN: the app must work with no internet, and a page that is plain HTML + inline CSS works in
any browser and leaves nothing to inject into (every text is escaped; the server's Content-Security-Policy
forbids scripts outright). The report section is `report_render.render_html`'s own body, so the page, the
downloaded HTML and `cli.py report --format html` say the same.
"""
from __future__ import annotations

import html
import re
from urllib.parse import quote

from rag_ecg.data.images import FORMATS
from rag_ecg.data.text_repair import repair_report
from rag_ecg.reader.report import NOTICE
from rag_ecg.reader.report_render import case_findings, render_html
from rag_ecg.search.evidence import similarity_text
from rag_ecg.search.evidence import Neighbour
from rag_ecg.app.analysis import Result, case_report_view
from rag_ecg.app.uploads import Example

e = html.escape

CSS = """body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3a5f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}
header a{color:#fff}header .app{font-weight:700;font-size:1.2em}main{max-width:1250px;margin:0 auto;padding:.5em 1.2em 3em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4em 1.2em 1em;margin:1em 0}
.notice{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;font-weight:600}
.error{background:#fde8e8;border:1px solid #e3a0a0;color:#8a1111;padding:.7em 1em;font-weight:600;font-family:monospace}
.urgent{background:#b42318;color:#fff;padding:.5em 1em;font-weight:700}.cites{color:#555;font-size:.9em}
.dropped{background:#fde8e8;padding:.5em 1em}.measured{border-left:4px solid #3e7cb1;padding-left:1em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
img{max-width:100%;border:1px solid #ccc}.overlay img{width:100%}.missing{color:#a00}
.cases{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:1em}
.case{border:1px solid #ddd;border-radius:6px;padding:.5em;background:#fff}.case.cited{border:2px solid #3e7cb1}
.case h3{margin:.2em 0;font-size:1em}.case .meta{color:#555;font-size:.88em}.case ul{padding-left:1.2em;margin:.3em 0}
.case blockquote{margin:.3em 0;color:#444;font-size:.88em;border-left:3px solid #ddd;padding-left:.5em}
.tag{display:inline-block;background:#3e7cb1;color:#fff;border-radius:3px;padding:0 .4em;font-size:.8em}
.downloads a{margin-right:1.2em}.examples{display:flex;flex-wrap:wrap;gap:.5em}.examples button{cursor:pointer}
form.upload{display:flex;gap:1em;align-items:center;flex-wrap:wrap}.muted{color:#666;font-size:.9em}
pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"""


def _page(title: str, body: str, info: dict) -> str:
    head = (f'<header><span class="app">rag-ecg</span><a href="/">new ECG</a>'
            f"<span>reader: <b>{e(info.get('backend', '?'))}</b>{e(' · ' + info['model']) if info.get('model') else ''}"
            f"</span><span>index: <b>{e(str(info.get('index', '?')))}</b> ({int(info.get('cases', 0)):,} cases)</span>"
            f"</header>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>{head}<main>"
            f'<p class="notice">{e(NOTICE)}</p>{body}</main></body></html>\n')


def home_page(info: dict, examples: list[Example], error: str | None = None, max_upload_mb: float = 25) -> str:
    """The upload form and the examples; `error` (one line, as the CLI prints it) above them."""
    body = [f'<p class="error" id="error" role="alert">error: {e(error)}</p>' if error else ""]
    body.append(
        '<section id="upload"><h2>Read an ECG</h2>'
        '<form class="upload" method="post" action="/analyze" enctype="multipart/form-data">'
        '<input type="file" name="file" id="file" multiple required '
        'accept=".png,.jpg,.jpeg,.bmp,.tif,.tiff,.webp,.gif,.heic,.heif,.pdf,.hea,.dat">'
        '<label>Sex <select name="sex" id="sex"><option value="">unknown</option><option value="M">male</option>'
        '<option value="F">female</option></select></label> '
        '<label>Age <input type="number" name="age" id="age" min="0" max="130" step="1" placeholder="years">'
        '</label> <button type="submit" id="submit">Analyse</button></form>'
        f'<p class="muted">A picture ({e(FORMATS)}; a PDF\'s first page) or a WFDB record (choose its .hea and '
        f".dat together), up to {max_upload_mb:g} MB. Analyses run one at a time; the page loads when yours is "
        "done (a few seconds each).</p></section>")
    if examples:
        buttons = "".join(f'<button type="submit" name="example" value="{e(x.key, quote=True)}">{e(x.key)}</button>'
                          for x in examples)
        body.append('<section id="examples"><h2>Or try a real picture</h2>'
                    f'<form class="examples" method="post" action="/analyze" enctype="multipart/form-data">{buttons}'
                    "</form></section>")
    return _page("rag-ecg", "".join(body), info)


def report_fragment(result: Result) -> str:
    """`render_html`'s body for this result, without its own query picture and case thumbnails (the page shows
    the overlay and the cases itself)."""
    page = render_html(case_report_view(result.report))
    m = re.search(r"<body[^>]*>(.*)</body>", page, re.S | re.I)
    return m.group(1) if m else page


def _num(v, unit: str = "") -> str:
    """A measured value as shown: "–" when missing, never "-0" (a rounded tiny negative)."""
    return "–" if v is None else f"{v + 0.0:g}{unit}" if isinstance(v, (int, float)) else e(str(v))


def measurements_table(m: dict) -> str:
    """The tracing's measurements as `cli.py measure` shows them (ms, bpm), ST per lead in mV."""
    if m.get("error"):
        return f'<p class="missing" id="measure-error">not measurable: {e(m["error"])}</p>'
    rr = m.get("rr_irregular")
    cells = [("Heart rate", _num(m.get("heart_rate_bpm"), " bpm")),
             ("RR", "–" if rr is None else "irregular" if rr else "regular"),
             ("QRS axis", _num(m.get("qrs_axis_deg"), "°")), ("PR", _num(m.get("pr_ms"), " ms")),
             ("QRS", _num(m.get("qrs_ms"), " ms")), ("QT", _num(m.get("qt_ms"), " ms")),
             ("QTc Bazett", _num(m.get("qtc_bazett_ms"), " ms")), ("QTc Fridericia", _num(m.get("qtc_fridericia_ms"), " ms")),
             ("STEMI criteria", e(", ".join(m.get("stemi_criteria") or [])) or "none met"),
             ("Prior-MI Q waves", e(", ".join(m.get("prior_mi_q_leads") or [])) or "none met"),
             ("Sex (thresholds)", {"M": "male", "F": "female"}.get(m.get("sex") or "", "unknown"))]
    out = ('<table id="measurements"><tr>' + "".join(f"<th>{k}</th>" for k, _ in cells) + "</tr><tr>"
           + "".join(f"<td>{v}</td>" for _, v in cells) + "</tr></table>")
    rows = [(what, m.get(key) or {}) for what, key in (("at J (mV)", "st_j_mv"), ("at J+60 ms (mV)", "st_mv"))]
    leads = list(dict.fromkeys(ld for _, st in rows for ld in st))
    if leads:  # the STEMI criteria read the J point; J+60 ms is shown as measuring programs print it
        out += ("<table><tr><th>ST</th>" + "".join(f"<th>{e(ld)}</th>" for ld in leads) + "</tr>"
                + "".join(f"<tr><td>{what}</td>" + "".join(f"<td>{_num(st.get(ld))}</td>" for ld in leads) + "</tr>"
                          for what, st in rows if st) + "</table>")
    why = m.get("not_measured") or {}
    if why:
        out += '<p class="muted">Not measured: ' + "; ".join(f"{e(k)}: {e(str(v))}" for k, v in why.items()) + "</p>"
    return out


def case_card(result: Result, n: Neighbour, cited: set[int]) -> str:
    """One similar case: its page, ids, similarity, who, superclasses, its statements in English and its own
    report (repaired, quoted), worded as `report_render` words them."""
    img = (f'<img src="/r/{e(result.id)}/case/{n.case_id}.jpg" alt="case {n.case_id}">'
           if n.image_path else '<p class="missing">no page kept for this case</p>')
    findings = "".join(f"<li>{e(f)}</li>" for f in case_findings(n)) or "<li>no coded statements</li>"
    who = f"{'?' if n.age is None else f'{n.age:g}'} y, {e(n.sex or '?')}"
    tag = ' <span class="tag">cited</span>' if n.case_id in cited else ""
    return (f'<div class="case{" cited" if n.case_id in cited else ""}" data-case-id="{n.case_id}">{img}'
            f"<h3>case {n.case_id}{tag}</h3>"
            f'<div class="meta">{e(n.source)} {e(n.external_id)} · similarity <span class="sim">'
            f"{e(similarity_text(n.score, n.similarity_pct))}</span><br>{who} · "
            f"{e(' '.join(n.labels) or 'no superclass')}</div><ul>{findings}</ul>"
            f"<blockquote>{e(repair_report(n.report) or 'no report text')}</blockquote></div>")


def result_page(result: Result, info: dict) -> str:
    """Overlay + downloads, measurements, the grounded report, then the similar cases it cites."""
    rid = e(result.id)
    d = result.digitized
    q = d.get("quality") or {}
    cited = set(result.report.cited_case_ids)
    dl = (f'<p class="downloads" id="downloads"><a href="/r/{rid}/report.json" download>report (JSON)</a>'
          f'<a href="/r/{rid}/report.html" download>report (HTML)</a>'
          f'<a href="/r/{rid}/record.zip" download>digitised record (WFDB, zip)</a>'
          f'<a href="/r/{rid}/overlay.png?download=1" download>overlay (PNG)</a></p>')
    notes = "".join(f'<p class="muted">{e(x)}</p>' for x in result.notes)
    urgent = "".join(f'<p class="urgent">{e(f.text)}</p>' for f in result.report.measured_findings if f.urgent)
    body = [
        urgent + f'<section class="overlay" id="overlay-section"><h2>{e(result.name)}: digitised traces</h2>{notes}'
        f'<p class="muted">layout {e(str(d.get("layout")))} · {_num(d.get("px_per_mm"))} px/mm from the '
        f'{e(str(d.get("px_per_mm_source")))} · {_num(d.get("paper_speed_mm_s"))} mm/s · {_num(d.get("gain_mm_mv"))} '
        f'mm/mV · read quality {_num(q.get("score"))} · {result.seconds:g} s</p>{dl}'
        f'<img id="overlay" src="/r/{rid}/overlay.png" alt="{e(result.name, quote=True)} with the digitised '
        f'traces drawn over it"></section>',
        f'<section id="measure"><h2>Measurements</h2>{measurements_table(result.measurements)}</section>',
        f'<section id="report" data-cited="{e(" ".join(map(str, sorted(cited))))}">{report_fragment(result)}</section>',
        f'<section id="neighbours"><h2>Similar cases ({len(result.evidence.neighbours)})</h2><div class="cases">'
        + "".join(case_card(result, n, cited) for n in result.evidence.neighbours) + "</div></section>",
    ]
    return _page(f"rag-ecg: {result.name}", "".join(body), info)


def error_page(error: str, info: dict) -> str:
    """A page that is only the one-line error (a result that is gone, a route that does not exist)."""
    return _page("rag-ecg: error", f'<p class="error" id="error" role="alert">error: {e(error)}</p>'
                 '<p><a href="/">read an ECG</a></p>', info)


def download_name(result: Result, what: str) -> str:
    """`Content-Disposition` value for a download, the user's stem in it (RFC 5987 for non-ASCII)."""
    fname = {"report.json": f"{result.stem}.report.json", "report.html": f"{result.stem}.report.html",
             "record.zip": f"{result.stem}.wfdb.zip", "overlay.png": f"{result.stem}.overlay.png"}[what]
    return f"attachment; filename=\"{fname}\"; filename*=UTF-8''{quote(fname)}"
