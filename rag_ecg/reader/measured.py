"""Findings that follow from the tracing's measurements by fixed rules, kept apart from the neighbours' votes.

Why rules on measurements: a rate of 120 bpm or a PR of 240 ms is a fact of this tracing, not something the
similar cases can vote on; the held-out anterior STEMI the votes called "conduction disturbance" is why the
ST-elevation rule comes first and is marked urgent. Input is the measurement JSON (`Measurements.to_dict()`,
the `cli.py measure` keys) plus `sex` ("M" / "F" / None); a value that is None gives no finding and is shown
as not measurable with its reason, never filled in.
"""
from __future__ import annotations

from dataclasses import dataclass

TACHY_BPM, BRADY_BPM = 100.0, 50.0  # > 100 bpm tachycardia, < 50 bpm bradycardia
LEFT_AXIS_DEG, RIGHT_AXIS_DEG = -30.0, 90.0
LONG_PR_MS, WIDE_QRS_MS = 200.0, 120.0
LONG_QTC_MS = {"F": 460.0, "M": 450.0, None: 460.0}  # QTc (Bazett) from which it is long, by sex
SEX_NAMES = {"F": "women", "M": "men", None: "sex unknown"}
# the report fields that a reader may fill from the measurements, and the measurement key each comes from
FIELD_KEYS = {"rate_bpm": "heart_rate_bpm", "axis": "qrs_axis_deg", "pr_ms": "pr_ms", "qrs_ms": "qrs_ms",
              "qt_ms": "qt_ms", "qtc_ms": "qtc_bazett_ms"}


@dataclass
class MeasuredFinding:
    """A rule-based finding from the measurements: `basis` is always "measured" (not a vote, cites no case)."""

    code: str  # STEMI | PRIOR_MI_Q | TACHY | BRADY | IRREG | LAD | RAD | EXTREME_AXIS | AVB1 | WIDE_QRS | LONG_QTC
    text: str
    urgent: bool = False
    basis: str = "measured"


def norm_sex(sex: object) -> str | None:
    s = str(sex or "").strip().upper()[:1]
    return s if s in ("M", "F") else None


def axis_kind(deg: float) -> tuple[str | None, str]:
    """(finding code or None, words) for a frontal QRS axis in degrees in (-180, 180]."""
    if -90.0 <= deg < LEFT_AXIS_DEG:
        return "LAD", "left axis deviation"
    if RIGHT_AXIS_DEG < deg <= 180.0:
        return "RAD", "right axis deviation"
    if deg < -90.0:
        return "EXTREME_AXIS", "extreme axis deviation"
    return None, "normal"


def axis_text(deg: float | None) -> str | None:
    """"+45° (normal)", "-60° (left axis deviation)", ...; None when not measured."""
    return None if deg is None else f"{float(deg):+.0f}° ({axis_kind(float(deg))[1]})"


def _st_mm(m: dict, leads: list[str]) -> str:
    """The flagged leads' ST at the J point (where the criteria read it; J+60 ms from older measurement JSON)."""
    st = m.get("st_j_mv") or m.get("st_mv") or {}
    return ", ".join(f"{ld} {10.0 * st[ld]:+.1f} mm" for ld in leads if st.get(ld) is not None)


def _q_text(q: dict) -> str:
    """"QS" or "Q 36 ms 0.21 mV" for one lead's entry of `q_waves`."""
    return "QS" if q.get("qs") else f"Q {q.get('ms', 0):g} ms {q.get('mv', 0):.2f} mV"


def measured_findings(m: dict | None, sex: str | None = None) -> list[MeasuredFinding]:
    """The rule-based findings of one measurement set, an urgent STEMI finding first."""
    if not m or m.get("error"):
        return []
    sex = norm_sex(sex if sex is not None else m.get("sex"))
    out: list[MeasuredFinding] = []
    if m.get("stemi_criteria"):
        leads = list(m["stemi_criteria"])
        where = "the J point" if m.get("st_j_mv") else "J+60 ms"
        out.append(MeasuredFinding(
            "STEMI", f"URGENT: ST elevation meeting the STEMI criteria (Fourth Universal Definition of MI) in "
                     f"contiguous leads {', '.join(leads)} ({_st_mm(m, leads)} at {where}) — measured; needs "
                     "immediate clinical review", urgent=True))
    if m.get("prior_mi_q_leads"):
        leads = list(m["prior_mi_q_leads"])
        q = m.get("q_waves") or {}
        shown = ", ".join(f"{ld} {_q_text(q[ld])}" for ld in leads if ld in q)
        out.append(MeasuredFinding(
            "PRIOR_MI_Q", f"Q waves meeting the criteria of prior myocardial infarction (Fourth Universal "
                          f"Definition) in {', '.join(leads)} ({shown}): infarct of undetermined age — measured"))
    hr = m.get("heart_rate_bpm")
    if hr is not None and hr > TACHY_BPM:
        out.append(MeasuredFinding("TACHY", f"Tachycardia: heart rate {hr:g} bpm (> {TACHY_BPM:g}) — measured"))
    elif hr is not None and hr < BRADY_BPM:
        out.append(MeasuredFinding("BRADY", f"Bradycardia: heart rate {hr:g} bpm (< {BRADY_BPM:g}) — measured"))
    if m.get("rr_irregular"):
        out.append(MeasuredFinding("IRREG", "Irregularly irregular RR intervals (as in atrial fibrillation) "
                                            "— measured"))
    ax = m.get("qrs_axis_deg")
    code, words = axis_kind(float(ax)) if ax is not None else (None, "")
    if code:
        out.append(MeasuredFinding(code, f"{words.capitalize()}: frontal QRS axis {float(ax):+.0f}° — measured"))
    pr = m.get("pr_ms")
    if pr is not None and pr > LONG_PR_MS:
        out.append(MeasuredFinding("AVB1", f"PR {pr:g} ms (> {LONG_PR_MS:g} ms): first-degree AV block — measured"))
    qrs = m.get("qrs_ms")
    if qrs is not None and qrs >= WIDE_QRS_MS:
        out.append(MeasuredFinding("WIDE_QRS", f"QRS {qrs:g} ms (≥ {WIDE_QRS_MS:g} ms): wide QRS (bundle branch "
                                               "block or intraventricular conduction delay) — measured"))
    qtc = m.get("qtc_bazett_ms")
    if qtc is not None and qtc >= LONG_QTC_MS[sex]:
        out.append(MeasuredFinding("LONG_QTC", f"Long QTc: {qtc:g} ms (Bazett; ≥ {LONG_QTC_MS[sex]:g} ms, the "
                                               f"threshold for {SEX_NAMES[sex]}) — measured"))
    return out


def not_measurable(m: dict | None, key: str) -> str:
    """Why a measurement is missing: its own reason, the whole measurement's error, or 'not measured'."""
    if not m:
        return "not measured"
    why = (m.get("not_measured") or {}).get(key) or m.get("error") or ""
    return f"not measurable ({why})" if why else "not measurable"


def _val(m: dict, key: str, unit: str) -> str:
    v = m.get(key)
    return f"{v:g} {unit}" if v is not None else not_measurable(m, key)


def summary_line(m: dict) -> str:
    """The measurements in one line: rate, RR, axis, PR, QRS, QT, QTc (each value or why it is missing)."""
    if m.get("error"):
        return f"not measurable ({m['error']})"
    rr = m.get("rr_irregular")
    rr_txt = "not measurable" if rr is None else ("irregularly irregular" if rr else "regular")
    ax = axis_text(m.get("qrs_axis_deg")) or not_measurable(m, "qrs_axis_deg")
    return (f"heart rate {_val(m, 'heart_rate_bpm', 'bpm')}; RR intervals {rr_txt}; frontal QRS axis {ax}; "
            f"PR {_val(m, 'pr_ms', 'ms')}; QRS {_val(m, 'qrs_ms', 'ms')}; QT {_val(m, 'qt_ms', 'ms')}; "
            f"QTc {_val(m, 'qtc_bazett_ms', 'ms')} (Bazett), {_val(m, 'qtc_fridericia_ms', 'ms')} (Fridericia)")


def prompt_block(m: dict | None, findings: list[MeasuredFinding]) -> str:
    """What the LLM is told: the measured facts and the rule-based findings (empty when nothing was measured)."""
    if not m:
        return ""
    lines = ["Measured from the tracing (signal processing on this ECG's digitised signal, not the retrieved "
             "cases; use these values, write null where one is not measurable): " + summary_line(m) + "."]
    if findings:
        lines.append("Rule-based findings from these measurements: " + "; ".join(f.text for f in findings) + ".")
    return "\n".join(lines)
