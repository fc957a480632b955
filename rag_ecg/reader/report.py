"""The grounded report: its schema and the citation check that keeps it grounded.

Every statement a reader makes carries the ids of the retrieved cases that support it, so a clinician
can check the claim against the cases; `check_citations` drops any statement that cites a case the
retrieval did not return (a hallucinated citation is worse than none). Measurements the reader could
not make stay `None`: nothing is invented to fill the schema. `parse` reads a model's answer into a
Report; `report_render` writes one as text, JSON or HTML. Measurements of the tracing itself (`measurements`,
the `cli.py measure` JSON) and the findings that follow from them by rule (`measured_findings`) have their own
fields, so a reader of the report always sees which claims were measured and which the neighbours voted.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from rag_ecg.reader.measured import FIELD_KEYS, MeasuredFinding, axis_text, measured_findings

if TYPE_CHECKING:
    from rag_ecg.search.evidence import Evidence

NOTICE = "Not for clinical use without review by a qualified clinician."

# Plausible ranges: a value outside them is a misread, not a measurement (units: bpm, ms).
RATE_RANGE = (15.0, 350.0)
INTERVAL_RANGES: dict[str, tuple[float, float]] = {
    "pr_ms": (40.0, 600.0), "qrs_ms": (30.0, 300.0), "qt_ms": (150.0, 800.0), "qtc_ms": (150.0, 800.0),
}
_INLINE_CITE = re.compile(r"\[\s*case\s*#?\s*(\d+)\s*\]", re.I)


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
    basis: str = "votes"  # "votes": the similar cases (or the LLM on them); "measured": a rule on the tracing


@dataclass
class CaseRef:
    """A retrieved case as the report records it (enough to show and look it up)."""

    case_id: int
    source: str = ""
    external_id: str = ""
    score: float = 0.0
    image_path: str | None = None
    similarity_pct: float | None = None  # % of held-out pictures' best matches less similar (see Calibration.percentile)


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
                   cases=[CaseRef(n.case_id, n.source, n.external_id, float(n.score), n.image_path,
                                  n.similarity_pct) for n in evidence.neighbours])

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
    measurements: dict | None = None  # Measurements.to_dict() (+ "sex"); all None + "error" when not measurable
    measured_findings: list[MeasuredFinding] = field(default_factory=list)  # rule-based, urgent first
    measured_fields: list[str] = field(default_factory=list)  # rate_bpm / axis / pr_ms ... filled from them
    notes: list[str] = field(default_factory=list)  # how the reader was asked (e.g. evidence cut to fit the window)

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
            notice=d.get("notice", NOTICE), measurements=d.get("measurements"),
            measured_findings=[MeasuredFinding(**x) for x in d.get("measured_findings") or []],
            measured_fields=list(d.get("measured_fields") or []), notes=list(d.get("notes") or []),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def with_measurements(report: Report, measurements: dict | None, fill: bool = False) -> Report:
    """The report with the tracing's measurements and their rule-based findings attached. `fill`: also set
    rate, axis, intervals (and the rhythm, when none was stated) from them and name those in `measured_fields`
    (the retrieval reader, which cannot estimate them otherwise); a value not measured stays None."""
    if measurements is None:
        return report
    found = measured_findings(measurements)
    if not fill or measurements.get("error"):
        return replace(report, measurements=measurements, measured_findings=found)
    m = measurements
    filled = [f for f, k in FIELD_KEYS.items() if m.get(k) is not None]
    iv = Intervals(pr_ms=m.get("pr_ms"), qrs_ms=m.get("qrs_ms"), qt_ms=m.get("qt_ms"), qtc_ms=m.get("qtc_bazett_ms"))
    rhythm = report.rhythm
    if rhythm is None and m.get("rr_irregular") is not None:
        rr = "Irregularly irregular" if m["rr_irregular"] else "Regular"
        rhythm = Statement(f"{rr} RR intervals (measured); the similar cases name no rhythm", [])
        filled.append("rhythm")
    return replace(report, rhythm=rhythm, rate_bpm=m.get("heart_rate_bpm"), axis=axis_text(m.get("qrs_axis_deg")),
                   intervals=iv, measurements=m, measured_findings=found, measured_fields=filled)


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
