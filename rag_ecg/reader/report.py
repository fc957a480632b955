"""The grounded report: schema, parsing of a model's answer, citation check, and rendering.

Every statement a reader makes carries the ids of the retrieved cases that support it, so a clinician
can check the claim against the cases; `check_citations` drops any statement that cites a case the
retrieval did not return (a hallucinated citation is worse than none). Measurements the reader could
not make stay `None`: nothing is invented to fill the schema.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_ecg.data.labels import SUPERCLASS_NAMES, SUPERCLASSES
from rag_ecg.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.search.evidence import Evidence

NOTICE = "Not for clinical use without review by a qualified clinician."

# Plausible ranges: a value outside them is a misread, not a measurement (units: bpm, ms).
RATE_RANGE = (15.0, 350.0)
INTERVAL_RANGES: dict[str, tuple[float, float]] = {
    "pr_ms": (40.0, 600.0), "qrs_ms": (30.0, 300.0), "qt_ms": (150.0, 800.0), "qtc_ms": (150.0, 800.0),
}
_ANSWER_KEYS = ("rhythm", "rate_bpm", "axis", "intervals", "findings", "diagnoses", "impression")
_INLINE_CITE = re.compile(r"\[\s*case\s*#?\s*(\d+)\s*\]", re.I)


class ParseError(InputError):
    """A model answer that does not hold a valid report JSON; the message says what is wrong."""


@dataclass
class Statement:
    """One claim of the report and the retrieved cases (store ids) that support it."""

    text: str
    cited: list[int] = field(default_factory=list)


@dataclass
class Intervals:
    """Intervals in milliseconds; None where they could not be measured."""

    pr_ms: float | None = None
    qrs_ms: float | None = None
    qt_ms: float | None = None
    qtc_ms: float | None = None


@dataclass
class Diagnosis:
    """A diagnostic statement: SCP-ECG code and/or PTB-XL superclass, with confidence in [0, 1]."""

    label: str
    confidence: float
    code: str | None = None
    superclass: str | None = None
    cited: list[int] = field(default_factory=list)


@dataclass
class CaseRef:
    """A retrieved case as the report records it (enough to show and look it up)."""

    case_id: int
    source: str = ""
    external_id: str = ""
    score: float = 0.0
    image_path: str | None = None


@dataclass
class RetrievalInfo:
    """The retrieval settings behind a report, so it can be reproduced."""

    k: int = 0
    index_name: str = ""
    encoder_hash: str = ""
    cases: list[CaseRef] = field(default_factory=list)
    superclass_scores: dict[str, float] = field(default_factory=dict)  # the neighbours' calibrated votes

    @classmethod
    def from_evidence(cls, evidence: "Evidence") -> "RetrievalInfo":
        return cls(k=evidence.k or len(evidence.neighbours), index_name=evidence.index_name,
                   encoder_hash=evidence.encoder_hash, superclass_scores=dict(evidence.superclass_scores),
                   cases=[CaseRef(n.case_id, n.source, n.external_id, float(n.score), n.image_path)
                          for n in evidence.neighbours])

    @property
    def case_ids(self) -> list[int]:
        return [c.case_id for c in self.cases]


@dataclass
class DroppedStatement:
    """A statement the citation check removed: where it was, what it said, which ids were unknown."""

    where: str
    text: str
    cited: list[int]
    unknown: list[int]


@dataclass
class Report:
    """A grounded ECG interpretation; `parsed=False` means only `raw_text` holds the reader's answer."""

    rhythm: Statement | None = None
    rate_bpm: float | None = None
    axis: str | None = None
    intervals: Intervals = field(default_factory=Intervals)
    findings: list[Statement] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)
    impression: Statement | None = None
    backend: str = ""
    model: str = ""
    retrieval: RetrievalInfo = field(default_factory=RetrievalInfo)
    parsed: bool = True
    raw_text: str | None = None
    parse_error: str | None = None
    dropped_citations: list[DroppedStatement] = field(default_factory=list)
    notice: str = NOTICE

    @property
    def cited_case_ids(self) -> list[int]:
        """Every case id cited anywhere in the report, in first-cited order."""
        seen: dict[int, None] = {}
        for _, cited in _cited_parts(self):
            for c in cited:
                seen.setdefault(c, None)
        return list(seen)

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        def stmt(x):
            return None if x is None else Statement(**x)

        ret = d.get("retrieval") or {}
        return cls(
            rhythm=stmt(d.get("rhythm")), rate_bpm=d.get("rate_bpm"), axis=d.get("axis"),
            intervals=Intervals(**(d.get("intervals") or {})),
            findings=[Statement(**f) for f in d.get("findings", [])],
            diagnoses=[Diagnosis(**x) for x in d.get("diagnoses", [])],
            impression=stmt(d.get("impression")), backend=d.get("backend", ""), model=d.get("model", ""),
            retrieval=RetrievalInfo(**{**ret, "cases": [CaseRef(**c) for c in ret.get("cases", [])]}),
            parsed=d.get("parsed", True), raw_text=d.get("raw_text"), parse_error=d.get("parse_error"),
            dropped_citations=[DroppedStatement(**x) for x in d.get("dropped_citations", [])],
            notice=d.get("notice", NOTICE),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_text(self) -> str:
        return render_text(self)

    def to_html(self, query_image: "str | Path | Image.Image | None" = None,
                case_images: dict[int, str | Path] | None = None) -> str:
        return render_html(self, query_image=query_image, case_images=case_images)

    def render(self, fmt: str, **kwargs) -> str:
        """`fmt` is text | json | html."""
        if fmt == "text":
            return self.to_text()
        if fmt == "json":
            return self.to_json()
        if fmt == "html":
            return self.to_html(**kwargs)
        raise ValueError(f"report format {fmt!r}: expected text, json or html")

    def save(self, path: str | Path, fmt: str | None = None, **kwargs) -> Path:
        """Write atomically; the format follows the suffix (.txt/.json/.html) unless given."""
        path = Path(path)
        fmt = fmt or {".json": "json", ".html": "html", ".htm": "html"}.get(path.suffix.lower(), "text")
        write_atomic(path, self.render(fmt, **kwargs))
        return path


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder + os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unparsed_report(raw_text: str, error: str) -> Report:
    """The reader's answer kept verbatim when no valid JSON could be got from it."""
    return Report(parsed=False, raw_text=raw_text, parse_error=error)


# ---------------------------------------------------------------- citation check


def _cited_parts(report: Report) -> list[tuple[str, list[int]]]:
    parts: list[tuple[str, list[int]]] = []
    if report.rhythm is not None:
        parts.append(("rhythm", report.rhythm.cited))
    parts += [(f"findings[{i}]", s.cited) for i, s in enumerate(report.findings)]
    parts += [(f"diagnoses[{i}]", d.cited) for i, d in enumerate(report.diagnoses)]
    if report.impression is not None:
        parts.append(("impression", report.impression.cited))
    return parts


def inline_citations(text: str) -> list[int]:
    """Case ids cited in running text as `[case 123]`."""
    return [int(m) for m in _INLINE_CITE.findall(text or "")]


def check_citations(report: Report, evidence: "Evidence") -> Report:
    """Return a copy where every statement cites only retrieved cases; the rest are dropped and listed.

    Both the `cited` list and `[case N]` mentions in the statement's text count as citations.
    """
    allowed = set(evidence.case_ids)
    dropped = list(report.dropped_citations)

    def ok(where: str, text: str, cited: list[int]) -> bool:
        every = list(dict.fromkeys([*cited, *inline_citations(text)]))
        unknown = [c for c in every if c not in allowed]
        if unknown:
            dropped.append(DroppedStatement(where=where, text=text, cited=every, unknown=unknown))
        return not unknown

    def keep_stmt(where: str, s: Statement | None) -> Statement | None:
        if s is None or not ok(where, s.text, s.cited):
            return None
        return Statement(s.text, list(dict.fromkeys(s.cited)))

    findings = [Statement(s.text, list(dict.fromkeys(s.cited)))
                for i, s in enumerate(report.findings) if ok(f"findings[{i}]", s.text, s.cited)]
    diagnoses = [replace(d, cited=list(dict.fromkeys(d.cited)))
                 for i, d in enumerate(report.diagnoses) if ok(f"diagnoses[{i}]", d.label, d.cited)]
    return replace(report, rhythm=keep_stmt("rhythm", report.rhythm), findings=findings,
                   diagnoses=diagnoses, impression=keep_stmt("impression", report.impression),
                   dropped_citations=dropped)


# ---------------------------------------------------------------- parsing a model's answer


def extract_json(text: str) -> dict:
    """The report JSON object from an answer: the last ```json fence, else the last balanced {...}."""
    if not text or not text.strip():
        raise ParseError("the answer is empty")
    fences = list(re.finditer(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", text, re.S))
    for m in reversed(fences):
        obj = _loads_object(m.group(1))
        if obj is not None:
            return obj
    if text.count("```") % 2 == 1:  # a fence was opened and never closed: the answer was cut off
        tail = re.sub(r"^(?:json|JSON)?[ \t]*\n?", "", text.rsplit("```", 1)[1])
        if "{" in tail:
            obj = _loads_object(tail)
            if obj is not None:
                return obj
            raise ParseError("the ```json block is not closed and its JSON is incomplete (answer truncated?)")
    objects, unclosed = _balanced_objects(text)
    for span in reversed(objects):
        obj = _loads_object(span)
        if obj is not None and any(k in obj for k in _ANSWER_KEYS):
            return obj
    if unclosed:
        raise ParseError("the JSON object is not closed (answer truncated?)")
    if objects:
        raise ParseError("found {...} text but none of it is valid JSON with the report keys")
    raise ParseError("no JSON object found in the answer")


def _loads_object(s: str) -> dict | None:
    for candidate in (s, re.sub(r",\s*([}\]])", r"\1", s)):  # then tolerate trailing commas
        try:
            obj = json.loads(candidate.strip())
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _balanced_objects(text: str) -> tuple[list[str], bool]:
    """Top-level {...} spans (string-aware), and whether an object was left open at the end."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start:i + 1])
    return spans, depth > 0


def parse_answer(text: str) -> Report:
    """Validate the answer's JSON into a Report (parsed=True); raise ParseError naming the bad field."""
    obj = extract_json(text)
    if not any(k in obj for k in _ANSWER_KEYS):
        raise ParseError(f"the JSON has none of the report keys ({', '.join(_ANSWER_KEYS)})")
    intervals_in = obj.get("intervals") or {}
    if not isinstance(intervals_in, dict):
        raise ParseError("intervals must be an object with pr_ms, qrs_ms, qt_ms (numbers or null)")
    intervals = Intervals(**{k: _number(intervals_in.get(k), f"intervals.{k}", INTERVAL_RANGES[k])
                             for k in INTERVAL_RANGES})
    findings_in = obj.get("findings") or []
    if not isinstance(findings_in, list):
        raise ParseError("findings must be a list of {text, cited}")
    diagnoses_in = obj.get("diagnoses") or []
    if not isinstance(diagnoses_in, list):
        raise ParseError("diagnoses must be a list of {code, superclass, label, confidence, cited}")
    axis = obj.get("axis")
    if axis is not None and not isinstance(axis, str):
        raise ParseError("axis must be a string or null")
    return Report(
        rhythm=_statement(obj.get("rhythm"), "rhythm"),
        rate_bpm=_number(obj.get("rate_bpm", obj.get("rate")), "rate_bpm", RATE_RANGE),
        axis=_none_if_unknown(axis),
        intervals=intervals,
        findings=[s for i, f in enumerate(findings_in) if (s := _statement(f, f"findings[{i}]"))],
        diagnoses=[_diagnosis(d, f"diagnoses[{i}]") for i, d in enumerate(diagnoses_in)],
        impression=_statement(obj.get("impression"), "impression"),
        parsed=True, raw_text=text,
    )


_UNKNOWN = {"", "null", "none", "n/a", "na", "unknown", "not estimable", "not measurable", "-"}


def _none_if_unknown(s: str | None) -> str | None:
    return None if s is None or s.strip().lower() in _UNKNOWN else s.strip()


def _number(v: Any, where: str, bounds: tuple[float, float]) -> float | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _UNKNOWN):
        return None
    if isinstance(v, bool):
        raise ParseError(f"{where} must be a number or null, got {v!r}")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:bpm|ms|/min)?\s*", v, re.I)
        if not m:
            raise ParseError(f"{where} must be a number or null, got {v!r}")
        v = float(m.group(1))
    if not isinstance(v, (int, float)):
        raise ParseError(f"{where} must be a number or null, got {type(v).__name__}")
    lo, hi = bounds
    if not lo <= float(v) <= hi:
        raise ParseError(f"{where}={v:g} is outside the plausible range {lo:g}-{hi:g}")
    return float(v)


def _cited(v: Any, where: str) -> list[int]:
    if v is None:
        return []
    items = v if isinstance(v, list) else re.split(r"[,;]", v) if isinstance(v, str) else [v]
    out = []
    for x in items:
        if isinstance(x, bool):
            raise ParseError(f"{where}.cited must hold case ids (integers), got {x!r}")
        if isinstance(x, int):
            out.append(x)
            continue
        m = re.fullmatch(r"\s*\[?\s*(?:case\s*#?\s*)?(\d+)\s*\]?\s*", str(x), re.I)
        if not m:
            raise ParseError(f"{where}.cited must hold case ids (integers), got {x!r}")
        out.append(int(m.group(1)))
    return list(dict.fromkeys(out))


def _statement(v: Any, where: str) -> Statement | None:
    if v is None:
        return None
    if isinstance(v, str):
        text = _none_if_unknown(v)
        return None if text is None else Statement(text, inline_citations(text))
    if not isinstance(v, dict):
        raise ParseError(f"{where} must be {{\"text\": ..., \"cited\": [...]}} or a string")
    text = v.get("text", v.get("statement"))
    if text is None or not isinstance(text, str) or _none_if_unknown(text) is None:
        if where in ("rhythm", "impression") and not v.get("cited"):
            return None
        raise ParseError(f"{where}.text must be a non-empty string")
    return Statement(text.strip(), _cited(v.get("cited", v.get("cites", v.get("citations"))), where))


def _diagnosis(v: Any, where: str) -> Diagnosis:
    if not isinstance(v, dict):
        raise ParseError(f"{where} must be an object with code, superclass, label, confidence, cited")
    code = v.get("code") or None
    sup = v.get("superclass") or None
    if code is not None and not isinstance(code, str):
        raise ParseError(f"{where}.code must be an SCP-ECG code string or null")
    if sup is not None:
        if not isinstance(sup, str) or sup.strip().upper() not in SUPERCLASSES:
            raise ParseError(f"{where}.superclass must be one of {', '.join(SUPERCLASSES)} or null, got {sup!r}")
        sup = sup.strip().upper()
    label = v.get("label") or v.get("text")
    if label is not None and not isinstance(label, str):
        raise ParseError(f"{where}.label must be a string")
    label = (label or "").strip() or (SUPERCLASS_NAMES.get(sup, "") if sup else "") or (code or "")
    if not label:
        raise ParseError(f"{where} needs a label, code or superclass")
    conf = v.get("confidence")
    if conf is None:
        raise ParseError(f"{where}.confidence is missing (a number in [0, 1])")
    conf = _number(conf, f"{where}.confidence", (0.0, 1.0))
    return Diagnosis(label=label, confidence=float(conf), code=code.strip().upper() if code else None,
                     superclass=sup, cited=_cited(v.get("cited", v.get("cites")), where))


# ---------------------------------------------------------------- rendering


def _cites(ids: list[int]) -> str:
    return f" [case{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}]" if ids else ""


def _fmt_num(v: float | None, unit: str) -> str:
    return "not estimated" if v is None else f"{v:g} {unit}"


def _diag_name(d: Diagnosis) -> str:
    tag = " / ".join(x for x in (d.superclass, d.code) if x)
    return f"{d.label} ({tag})" if tag and tag != d.label else d.label


def render_text(r: Report) -> str:
    """Plain text for a terminal or a chart note."""
    out = [f"ECG interpretation — backend {r.backend or '?'}, model {r.model or '-'}",
           r.notice.upper(), ""]
    if not r.parsed:
        out += [f"The reader's answer could not be parsed ({r.parse_error}). Raw answer:", "",
                r.raw_text or "", ""]
    else:
        out.append(f"Rhythm: {r.rhythm.text + _cites(r.rhythm.cited) if r.rhythm else 'not determined'}")
        out.append(f"Rate: {_fmt_num(r.rate_bpm, 'bpm')}")
        out.append(f"Axis: {r.axis or 'not estimated'}")
        iv = r.intervals
        out.append(f"Intervals: PR {_fmt_num(iv.pr_ms, 'ms')}; QRS {_fmt_num(iv.qrs_ms, 'ms')}; "
                   f"QT {_fmt_num(iv.qt_ms, 'ms')}; QTc {_fmt_num(iv.qtc_ms, 'ms')}")
        out.append("Findings:" + ("" if r.findings else " none stated"))
        out += [f"  - {f.text}{_cites(f.cited)}" for f in r.findings]
        out.append("Diagnoses:" + ("" if r.diagnoses else " none above threshold"))
        out += [f"  - {_diag_name(d)}: confidence {d.confidence:.2f}{_cites(d.cited)}" for d in r.diagnoses]
        out.append(f"Impression: {r.impression.text + _cites(r.impression.cited) if r.impression else '-'}")
    if r.dropped_citations:
        out += ["", "Removed by the citation check (cited cases that were not retrieved):"]
        out += [f"  - {d.where}: {d.text!r} cited unknown case(s) {', '.join(map(str, d.unknown))}"
                for d in r.dropped_citations]
    ret = r.retrieval
    out += ["", f"Retrieval: k={ret.k}, index {ret.index_name or '-'}, encoder {ret.encoder_hash or '-'}"]
    out += [f"  case {c.case_id}: {c.source} {c.external_id}, similarity {c.score:.3f}" for c in ret.cases]
    return "\n".join(out) + "\n"


def thumbnail_data_url(image: "str | Path | Image.Image", max_side: int = 480) -> str:
    """A PNG thumbnail as a `data:` URL, so an HTML page carries its images inside it."""
    from PIL import Image as PILImage

    img = image if isinstance(image, PILImage.Image) else PILImage.open(image)
    img = img.convert("RGB")
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
.missing{color:#a00}"""


def render_html(report: Report, query_image=None, case_images: dict[int, str | Path] | None = None) -> str:
    """A self-contained page: images as base64 thumbnails, every text escaped."""
    e = html.escape
    r = report

    def cites(ids: list[int]) -> str:
        return f' <span class="cites">{e(_cites(ids).strip())}</span>' if ids else ""

    body = [f'<h1>ECG interpretation</h1><p class="notice">{e(r.notice)}</p>',
            f"<p>Backend <b>{e(r.backend or '?')}</b>, model <b>{e(r.model or '-')}</b></p>"]
    if query_image is not None:
        body.append(f"<h2>Query ECG</h2>{_img_tag(query_image, 'query ECG', 900)}")
    if not r.parsed:
        body.append(f"<h2>Unparsed answer</h2><p>{e(r.parse_error or '')}</p><pre>{e(r.raw_text or '')}</pre>")
    else:
        iv = r.intervals
        rows = [("Rhythm", (e(r.rhythm.text) + cites(r.rhythm.cited)) if r.rhythm else "not determined"),
                ("Rate", e(_fmt_num(r.rate_bpm, "bpm"))), ("Axis", e(r.axis or "not estimated")),
                ("Intervals", e(f"PR {_fmt_num(iv.pr_ms, 'ms')}; QRS {_fmt_num(iv.qrs_ms, 'ms')}; "
                                f"QT {_fmt_num(iv.qt_ms, 'ms')}; QTc {_fmt_num(iv.qtc_ms, 'ms')}"))]
        body.append("<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")
        body.append("<h2>Findings</h2><ul>" + "".join(f"<li>{e(f.text)}{cites(f.cited)}</li>" for f in r.findings)
                    + "</ul>" + ("" if r.findings else "<p>none stated</p>"))
        body.append("<h2>Diagnoses</h2><table><tr><th>Diagnosis</th><th>Confidence</th><th>Cited</th></tr>"
                    + "".join(f"<tr><td>{e(_diag_name(d))}</td><td>{d.confidence:.2f}</td>"
                              f"<td>{e(', '.join(map(str, d.cited)))}</td></tr>" for d in r.diagnoses)
                    + "</table>")
        if r.impression:
            body.append(f"<h2>Impression</h2><p>{e(r.impression.text)}{cites(r.impression.cited)}</p>")
    if r.dropped_citations:
        body.append('<div class="dropped"><h2>Removed by the citation check</h2><ul>' + "".join(
            f"<li>{e(d.where)}: {e(d.text)} — unknown case(s) {e(', '.join(map(str, d.unknown)))}</li>"
            for d in r.dropped_citations) + "</ul></div>")
    ret = r.retrieval
    cited = set(r.cited_case_ids)
    body.append(f"<h2>Retrieved cases</h2><p>k={ret.k}, index {e(ret.index_name or '-')}, "
                f"encoder {e(ret.encoder_hash or '-')}</p><table><tr><th>Case</th><th>Source</th>"
                "<th>Similarity</th><th>Cited</th></tr>" + "".join(
                    f"<tr><td>{c.case_id}</td><td>{e(c.source)} {e(c.external_id)}</td><td>{c.score:.3f}</td>"
                    f"<td>{'yes' if c.case_id in cited else ''}</td></tr>" for c in ret.cases) + "</table>")
    paths = {c.case_id: c.image_path for c in ret.cases if c.image_path}
    paths.update(case_images or {})
    figs = [f"<figure>{_img_tag(paths[cid], f'case {cid}', 360)}<figcaption>case {cid}</figcaption></figure>"
            for cid in r.cited_case_ids if cid in paths]
    if figs:
        body.append('<h2>Cited cases</h2><div class="cases">' + "".join(figs) + "</div>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ECG interpretation</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
