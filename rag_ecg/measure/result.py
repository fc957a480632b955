"""What a measurement returns: each value with the leads it came from and a confidence, None when not measured.

Why one record type: the CLI's JSON, the reports and the review columns all show the same fields; `to_dict`
keys are the CLI's JSON keys so that each of them is one call away.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rag_ecg.data.records import STANDARD_LEADS


@dataclass(frozen=True)
class Value:
    """One measured quantity: `value` (None: could not be measured, `why` says so), the leads used, 0-1 confidence."""

    value: float | None
    leads: tuple[str, ...] = ()
    confidence: float = 0.0
    why: str = ""

    @classmethod
    def missing(cls, why: str) -> Value:
        return cls(None, (), 0.0, why)

    def rounded(self, digits: int = 0) -> float | int | None:
        if self.value is None:
            return None
        return int(round(self.value)) if digits == 0 else round(float(self.value), digits)


@dataclass
class Measurements:
    """Rate, rhythm, axis, intervals (ms), ST per lead and the STEMI flag of one 12-lead ECG."""

    heart_rate_bpm: Value
    rr_irregular: Value  # value 1.0: irregularly irregular RR (as in atrial fibrillation), 0.0: not
    qrs_axis_deg: Value
    pr_ms: Value
    qrs_ms: Value
    qt_ms: Value
    qtc_bazett_ms: Value
    qtc_fridericia_ms: Value
    st_mv: dict[str, Value] = field(default_factory=dict)  # lead -> ST at J+60 ms vs the PR baseline
    st_j_mv: dict[str, Value] = field(default_factory=dict)  # lead -> ST at the J point vs the PR baseline
    stemi_criteria: list[str] | None = None  # the leads of the contiguous pairs meeting the criteria, else None
    stemi_pairs: list[tuple[str, str]] = field(default_factory=list)
    q_waves: dict[str, dict] = field(default_factory=dict)  # lead -> {"ms", "mv", "qs"} of its initial Q wave
    prior_mi_q_leads: list[str] | None = None  # leads whose Q waves meet the criteria of prior MI (measure.qwaves)
    beats: int = 0  # beats detected (on the longest lead)
    input: str = ""
    error: str | None = None

    @property
    def st_mm(self) -> dict[str, float | None]:
        """ST deviation in mm at the standard 10 mm/mV (1 mm = 0.1 mV), what the STEMI thresholds are written in."""
        return {ld: None if v.value is None else round(10.0 * v.value, 2) for ld, v in self.st_mv.items()}

    def leads_used(self) -> dict[str, list[str]]:
        named = {"heart_rate_bpm": self.heart_rate_bpm, "qrs_axis_deg": self.qrs_axis_deg, "pr_ms": self.pr_ms,
                 "qrs_ms": self.qrs_ms, "qt_ms": self.qt_ms}
        return {k: list(v.leads) for k, v in named.items() if v.value is not None}

    def to_dict(self) -> dict:
        """The CLI's JSON object (`python cli.py measure --format json`), plus confidences and reasons."""
        scalars = {"heart_rate_bpm": self.heart_rate_bpm, "qrs_axis_deg": self.qrs_axis_deg, "pr_ms": self.pr_ms,
                   "qrs_ms": self.qrs_ms, "qt_ms": self.qt_ms, "qtc_bazett_ms": self.qtc_bazett_ms,
                   "qtc_fridericia_ms": self.qtc_fridericia_ms}
        out: dict = {"input": self.input}
        out.update({k: v.rounded() for k, v in scalars.items()})
        out["rr_irregular"] = None if self.rr_irregular.value is None else bool(self.rr_irregular.value)
        out["st_mv"] = {ld: self.st_mv[ld].rounded(3) for ld in STANDARD_LEADS if ld in self.st_mv}
        out["st_j_mv"] = {ld: self.st_j_mv[ld].rounded(3) for ld in STANDARD_LEADS if ld in self.st_j_mv}
        out["stemi_criteria"] = self.stemi_criteria
        out["q_waves"] = {ld: self.q_waves[ld] for ld in STANDARD_LEADS if ld in self.q_waves}
        out["prior_mi_q_leads"] = self.prior_mi_q_leads
        out["leads_used"] = self.leads_used()
        out["confidence"] = {k: round(v.confidence, 2) for k, v in {**scalars, "rr_irregular": self.rr_irregular}.items()}
        out["not_measured"] = {k: v.why for k, v in {**scalars, "rr_irregular": self.rr_irregular}.items()
                               if v.value is None and v.why}
        out["error"] = self.error
        return out


def failed(input_name: str, error: str) -> dict:
    """The JSON object of an input that could not be measured: every measurement null, `error` its one line."""
    keys = ("heart_rate_bpm", "rr_irregular", "qrs_axis_deg", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
            "qtc_fridericia_ms", "st_mv", "st_j_mv", "stemi_criteria", "q_waves", "prior_mi_q_leads", "leads_used")
    return {"input": input_name, **{k: None for k in keys}, "error": error}
