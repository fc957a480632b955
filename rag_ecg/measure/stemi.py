"""ST elevation meeting the STEMI criteria of the Fourth Universal Definition of Myocardial Infarction (2018).

New ST elevation at the J point in two contiguous leads: >= 1 mm (0.1 mV) in every lead but V2-V3; in V2-V3
>= 2 mm in men >= 40 years, >= 2.5 mm in men < 40, >= 1.5 mm in women, and >= 1.5 mm when the sex is unknown
(the most sensitive of the sex-specific thresholds a reader would accept: a missed STEMI costs more than a
second look). "New" cannot be told from one tracing: the flag says the criteria are met on this ECG.

Contiguous pairs: neighbours in V1-V6; the inferior leads II, aVF, III among themselves; the high lateral
leads I and aVL; and V6 with I (both lateral). aVR is left out (its ST elevation with diffuse depression is a
different pattern, not a territorial STEMI), as are V7-V9 and the right-sided leads no 12-lead print carries.

Read at the J point, as the criteria are written, not at J+60 ms: in healthy precordial leads the ST has
already climbed into a tall T wave 60 ms after J. On 27 real hospital printouts (real-pictures/khan) the flag
at J+60 fired on 4 of 9 normal ECGs (V2-V5), at J on none, while still flagging all 3 acute MIs.
"""
from __future__ import annotations

CONTIGUOUS = (("V1", "V2"), ("V2", "V3"), ("V3", "V4"), ("V4", "V5"), ("V5", "V6"),
              ("II", "aVF"), ("aVF", "III"), ("II", "III"), ("I", "aVL"), ("I", "V6"))
OTHER_MM = 1.0
V2V3 = ("V2", "V3")


def v2v3_threshold_mm(sex: str | None, age: float | None) -> float:
    """The V2-V3 threshold: men >= 40: 2 mm, men < 40: 2.5 mm (age unknown: 2 mm), women and unknown sex: 1.5 mm."""
    s = (sex or "").strip().upper()[:1]
    if s == "M":
        return 2.5 if age is not None and age < 40 else 2.0
    return 1.5


def threshold_mm(lead: str, sex: str | None, age: float | None) -> float:
    return v2v3_threshold_mm(sex, age) if lead in V2V3 else OTHER_MM


def stemi_pairs(st_mm: dict[str, float | None], sex: str | None = None,
                age: float | None = None) -> list[tuple[str, str]]:
    """The contiguous lead pairs whose ST elevation (mm, 1 mm = 0.1 mV) both meet their lead's threshold."""
    def meets(lead: str) -> bool:
        v = st_mm.get(lead)
        return v is not None and v >= threshold_mm(lead, sex, age) - 1e-9

    return [(a, b) for a, b in CONTIGUOUS if meets(a) and meets(b)]


def stemi_leads(pairs: list[tuple[str, str]]) -> list[str] | None:
    """The leads of the pairs meeting the criteria, in standard order; None when no pair does."""
    if not pairs:
        return None
    order = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    named = {ld for pair in pairs for ld in pair}
    return [ld for ld in order if ld in named]
