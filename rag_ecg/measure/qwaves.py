"""Pathological Q waves: the ECG criteria of prior myocardial infarction (Fourth Universal Definition, 2018).

Why measured: an old infarct leaves Q waves, not ST elevation, and the library's neighbours often vote such a
tracing "ST/T change" or "conduction disturbance" (6 old infarcts among 27 real hospital printouts). The
criteria, read on each lead's median beat levelled on its PR segment:
- any Q wave in V2 or V3 lasting >= 20 ms (and >= 0.05 mV deep, above the read's noise), or QS complexes in
  both V2 and V3;
- a Q wave >= 30 ms and >= 0.1 mV deep, or a QS complex, in two leads of one contiguous group among the leads
  the definition names (I, aVL; II, aVF; V4-V6): a Q in III alone, aVR or V1 is normal.
The posterior criterion (a broad tall R in V1-V2 with an upright T) is not read. Measured on LUDB's signals:
12 of 27 records with a (prior) infarct, 5 of 73 without; on 27 real printouts 5 of 9 infarcts, none of 18 others.
"""
from __future__ import annotations

import numpy as np

from rag_ecg.data.records import STANDARD_LEADS

ONSET_MV = 0.02  # a lead's QRS starts where its median beat first leaves the PR baseline by this much
V2V3_MS, V2V3_MV = 20.0, 0.05
OTHER_MS, OTHER_MV = 30.0, 0.1
QS_R_MV, QS_DEPTH_MV = 0.05, 0.15  # a QS complex: no R wave above 0.05 mV, a negative deflection past 0.15 mV
GROUPS = (("I", "aVL"), ("II", "aVF"), ("V4", "V5", "V6"))


def q_waves(med: np.ndarray, qrs_on: int, qrs_off: int, fs: float) -> dict[str, dict]:
    """Per lead with a whole QRS: {"ms", "mv", "qs"} of its initial negative deflection (0 when it starts up)."""
    out = {}
    lead_in = int(round(0.01 * fs))  # the global onset is the earliest lead's: look 10 ms before it too
    for i, ld in enumerate(STANDARD_LEADS):
        seg = med[max(qrs_on - lead_in, 0):qrs_off + 1, i]
        if not len(seg) or not np.isfinite(seg).all():
            continue
        dev = np.flatnonzero(np.abs(seg) > ONSET_MV)
        if not len(dev):
            continue
        s0 = int(dev[0])
        ms = mv = 0.0
        if seg[s0] < 0:
            back = np.flatnonzero(seg[s0:] >= 0)
            end = s0 + (int(back[0]) if len(back) else len(seg) - s0)
            ms, mv = (end - s0) / fs * 1000.0, float(-seg[s0:end].min())
        qs = bool(seg.max() < QS_R_MV and -seg.min() > QS_DEPTH_MV)
        out[ld] = {"ms": round(ms, 1), "mv": round(mv, 3), "qs": qs}
    return out


def prior_mi_leads(q: dict[str, dict]) -> list[str] | None:
    """The leads whose Q waves meet the criteria of prior MI (standard order), None when none do."""
    def has(ld: str, ms: float, mv: float) -> bool:
        x = q.get(ld)
        return x is not None and (x["ms"] >= ms and x["mv"] >= mv or x["qs"])

    hit = {ld for ld in ("V2", "V3") if ld in q and q[ld]["ms"] >= V2V3_MS and q[ld]["mv"] >= V2V3_MV}
    if all(q.get(ld, {}).get("qs") for ld in ("V2", "V3")):
        hit |= {"V2", "V3"}
    for group in GROUPS:
        met = [ld for ld in group if has(ld, OTHER_MS, OTHER_MV)]
        if len(met) >= 2:
            hit |= set(met)
    return [ld for ld in STANDARD_LEADS if ld in hit] or None
