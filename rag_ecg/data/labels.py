"""The diagnostic vocabulary in one place: PTB-XL superclasses, their English names, SCP statements, the rhythm
and form-only codes, and how PTB-XL codes and LUDB's cardiologist statements map to superclasses."""
from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass
from pathlib import Path

SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")

SUPERCLASS_NAMES: dict[str, str] = {
    "NORM": "normal ECG",
    "MI": "myocardial infarction",
    "STTC": "ST/T change",
    "CD": "conduction disturbance",
    "HYP": "hypertrophy",
}

# PTB-XL's rhythm statements (scp_statements.csv, rhythm == 1) and its form-only statements (form == 1,
# diagnostic empty): the first feed the rhythm line, the second the findings; all other codes are diagnostic.
RHYTHM_CODES: dict[str, str] = {
    "SR": "sinus rhythm", "AFIB": "atrial fibrillation", "STACH": "sinus tachycardia",
    "SARRH": "sinus arrhythmia", "SBRAD": "sinus bradycardia", "PACE": "normal functioning artificial pacemaker",
    "SVARR": "supraventricular arrhythmia", "BIGU": "bigeminal pattern (unknown origin, SV or ventricular)",
    "AFLT": "atrial flutter", "SVTAC": "supraventricular tachycardia",
    "PSVT": "paroxysmal supraventricular tachycardia",
    "TRIGU": "trigeminal pattern (unknown origin, SV or ventricular)",
}
FORM_CODES: frozenset[str] = frozenset({
    "ABQRS", "PVC", "STD_", "VCLVH", "QWAVE", "LOWT", "NT_", "PAC", "LPR", "INVT", "LVOLT", "HVOLT",
    "TAB_", "STE_", "PRC(S)",
})


@dataclass(frozen=True)
class ScpStatement:
    """One row of PTB-XL's scp_statements.csv: a code, its description and what kind of statement it is."""

    code: str
    description: str
    diagnostic_class: str | None  # NORM/MI/STTC/CD/HYP for diagnostic statements
    diagnostic_subclass: str | None
    kinds: tuple[str, ...]  # subset of ("diagnostic", "form", "rhythm")


def read_scp_statements(path: str | Path) -> dict[str, ScpStatement]:
    out: dict[str, ScpStatement] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            code = row[""] if "" in row else row.get("scp_code", "")
            kinds = tuple(k for k in ("diagnostic", "form", "rhythm") if _truthy(row.get(k)))
            out[code] = ScpStatement(
                code=code, description=row["description"].strip(),
                diagnostic_class=(row.get("diagnostic_class") or "").strip() or None,
                diagnostic_subclass=(row.get("diagnostic_subclass") or "").strip() or None,
                kinds=kinds,
            )
    return out


def _truthy(v: str | None) -> bool:
    try:
        return float(v) == 1.0
    except (TypeError, ValueError):
        return False


def superclasses_for(codes: dict[str, float], statements: dict[str, ScpStatement]) -> list[str]:
    """PTB-XL's own aggregation: every diagnostic statement present maps to its class (any likelihood)."""
    found = {statements[c].diagnostic_class for c in codes
             if c in statements and "diagnostic" in statements[c].kinds and statements[c].diagnostic_class}
    return [s for s in SUPERCLASSES if s in found]


def parse_scp_codes(text: str) -> dict[str, float]:
    value = ast.literal_eval(text) if text and text.strip() else {}
    return {str(k): float(v) for k, v in value.items()}


# LUDB's cardiologist statements -> PTB-XL diagnostic superclasses. NORM only when nothing else is
# stated beyond sinus rhythm and a normal/vertical/horizontal axis (PTB-XL's NORM means "normal ECG").
_LUDB_MAP: list[tuple[str, str]] = [
    (r"stemi|scar formation|ischemia/scar/supp\.nstemi|myocardial infarction", "MI"),
    (r"\bischemia\b|non-specific repolarization|st[- ]segment", "STTC"),
    (r"bundle branch block|hemiblock|av[- ]?block|degree av|intravintricular|intraventricular|"
     r"wpw|pre-excitation|pacing|pacemaker", "CD"),
    (r"ventricular hypertrophy|atrial hypertrophy|ventricular overload|atrial overload", "HYP"),
]
_LUDB_ABNORMAL_RHYTHM = re.compile(r"fibrillation|flutter|tachycardia|extrasystol|pvc|pac\b", re.I)


def ludb_superclasses(diagnoses: list[str]) -> list[str]:
    """Map LUDB diagnosis lines to PTB-XL superclasses (the mapping is stated in README)."""
    found: set[str] = set()
    for line in diagnoses:
        low = line.lower()
        for pattern, cls in _LUDB_MAP:
            if re.search(pattern, low):
                found.add(cls)
    abnormal = any(_LUDB_ABNORMAL_RHYTHM.search(d) for d in diagnoses) or any(
        re.search(r"left axis deviation|right axis deviation", d.lower()) for d in diagnoses)
    if not found and not abnormal:
        found.add("NORM")
    return [s for s in SUPERCLASSES if s in found]


def english_statements(codes: dict[str, float], descriptions: dict[str, str]) -> list[tuple[str, str, float]]:
    """(code, English description, likelihood) of a case's SCP statements, most likely first: how a case's
    findings are shown to people beside its (mostly German) report. PTB-XL's scp_statements.csv descriptions
    first; the rhythm and superclass names here where the store holds none; the bare code as the last resort."""
    out = []
    for code, lik in (codes or {}).items():
        text = descriptions.get(code) or RHYTHM_CODES.get(code) or SUPERCLASS_NAMES.get(code) or code
        out.append((code, text, float(lik or 0.0)))
    return sorted(out, key=lambda t: (-t[2], t[0]))
