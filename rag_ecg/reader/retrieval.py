"""The no-LLM reader: a report composed from the retrieved cases alone (the embedded default).

Diagnoses are the labels whose calibrated vote reaches the threshold (abstaining below it), each citing
the neighbours that carry the label; the rhythm is the best-voted rhythm code; the impression quotes the
most similar cases' reports. Rate, rhythm regularity, axis and intervals come from the tracing's own
measurements when the caller gives them (`rag_ecg.measure`), with the rule-based findings that follow from
them, marked as measured; without measurements, or where one failed, they stay unset: retrieval cannot
measure them and the report never invents them. Runs anywhere: no model, no GPU, no network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from rag_ecg.data.labels import FORM_CODES, RHYTHM_CODES, SUPERCLASS_NAMES, SUPERCLASSES, ScpStatement
from rag_ecg.errors import BackendError, InputError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.report import Diagnosis, Report, RetrievalInfo, Statement, with_measurements
from rag_ecg.search.evidence import ranked, similarity_text

if TYPE_CHECKING:
    from rag_ecg.search.evidence import Evidence, Neighbour


OUT_OF_LIBRARY_PCT = 2.0  # a best match weaker than 98 % of held-out pictures' best matches: say so in the report


@dataclass
class RetrievalReaderConfig:
    """Settings of the retrieval reader."""

    threshold: float | None = 0.5  # vote/probability a label needs; None = the index's per-label thresholds
    impression_cases: int = 3  # how many of the most similar cases' reports the impression quotes
    quote_chars: int = 160  # longest excerpt of a neighbour's report quoted in the impression


class RetrievalBackend(LLMBackend):
    """Composes a Report from Evidence; `generate` is not available (there is no language model)."""

    name = "retrieval"
    model = "similarity-vote"
    composes_reports = True

    def __init__(self, threshold: float | None = 0.5, impression_cases: int = 3, quote_chars: int = 160,
                 statements: dict[str, ScpStatement] | None = None):
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InputError(f"retrieval threshold {threshold}: must be within [0, 1]")
        self.config = RetrievalReaderConfig(threshold, impression_cases, quote_chars)
        self.statements = statements or {}  # optional SCP table: code -> superclass for code diagnoses

    def generate(self, messages: Sequence[Any], images: Sequence = ()) -> str:
        raise BackendError("the retrieval backend has no language model to generate text; it composes "
                           "reports from evidence (use interpret() or RetrievalBackend.compose())")

    # ------------------------------------------------------------------ composition

    def _threshold(self, evidence: "Evidence", label: str) -> float:
        if self.config.threshold is not None:
            return self.config.threshold
        return float((getattr(evidence, "thresholds", None) or {}).get(label, 0.5))

    @staticmethod
    def _fallback_votes(neighbours: Sequence["Neighbour"], key) -> dict[str, float]:
        """Similarity-weighted share of neighbours carrying each label (when retrieval gave no votes)."""
        weights = [max(float(n.score), 0.0) for n in neighbours]
        total = sum(weights) or 1.0
        votes: dict[str, float] = {}
        for n, w in zip(neighbours, weights, strict=True):
            for lab in key(n):
                votes[lab] = votes.get(lab, 0.0) + w / total
        return votes

    def compose(self, evidence: "Evidence", measurements: dict | None = None) -> Report:
        """The report from the neighbours' votes; `measurements` (Measurements.to_dict() + "sex") fill rate,
        axis, intervals and the measured findings."""
        ns = ranked(evidence.neighbours)  # citations in one order: by rounded similarity, then case id
        sup = dict(evidence.superclass_scores) or self._fallback_votes(ns, lambda n: n.labels)
        codes = dict(evidence.code_scores) or self._fallback_votes(ns, lambda n: n.codes.keys())

        def carriers(pred) -> list[int]:
            return [n.case_id for n in ns if pred(n)]

        def describe(code: str) -> str:
            for n in ns:
                if code in n.code_descriptions:
                    return n.code_descriptions[code]
            st = self.statements.get(code)
            return st.description if st else RHYTHM_CODES.get(code, code)

        # rhythm: the best-voted rhythm code that reaches the threshold
        rhythm_votes = sorted(((v, c) for c, v in codes.items() if c in RHYTHM_CODES), reverse=True)
        rhythm = None
        extra_rhythm = []
        for v, c in rhythm_votes:
            if v < self._threshold(evidence, c):
                continue
            stmt = Statement(f"{describe(c)} ({c}), as in the similar cases (vote {v:.2f})",
                             carriers(lambda n, c=c: c in n.codes))
            if rhythm is None:
                rhythm = stmt
            else:
                extra_rhythm.append(stmt)

        diagnoses = [
            Diagnosis(label=SUPERCLASS_NAMES[s], confidence=round(float(sup[s]), 4), superclass=s,
                      cited=carriers(lambda n, s=s: s in n.labels))
            for s in SUPERCLASSES if s in sup and sup[s] >= self._threshold(evidence, s)]
        diag_codes = sorted(((v, c) for c, v in codes.items()
                             if c not in RHYTHM_CODES and c not in FORM_CODES and v >= self._threshold(evidence, c)),
                            key=lambda x: (-x[0], x[1]))
        listed = {d.superclass for d in diagnoses}
        for v, c in diag_codes:
            if c in listed:  # PTB-XL's NORM is both a code and a superclass: state it once
                continue
            st = self.statements.get(c)
            diagnoses.append(Diagnosis(label=describe(c), confidence=round(float(v), 4), code=c,
                                       superclass=st.diagnostic_class if st else None,
                                       cited=carriers(lambda n, c=c: c in n.codes)))

        findings = list(extra_rhythm)
        form = sorted(((v, c) for c, v in codes.items() if c in FORM_CODES and v >= self._threshold(evidence, c)),
                      key=lambda x: (-x[0], x[1]))
        for v, c in form:
            cited = carriers(lambda n, c=c: c in n.codes)
            findings.append(Statement(f"{describe(c)} ({c}) in {len(cited)} of {len(ns)} similar cases "
                                      f"(vote {v:.2f})", cited))
        if ns and not diagnoses:
            top = sorted(((float(v), s) for s, v in sup.items()), reverse=True)[:2]
            spread = ", ".join(f"{s} {v:.2f}" for v, s in top) or "no labels"
            findings.append(Statement(f"No diagnostic label reached the vote threshold; the similar cases "
                                      f"disagree ({spread}). Abstaining.", []))

        diagnoses, notes = self._measured_mi(evidence, sup, diagnoses, measurements)
        report = Report(rhythm=rhythm, findings=findings, diagnoses=diagnoses, notes=notes,
                        impression=self._impression(ns, diagnoses), backend=self.name, model=self.model,
                        retrieval=RetrievalInfo.from_evidence(evidence), parsed=True)
        if ns and ns[0].similarity_pct is not None and ns[0].similarity_pct < OUT_OF_LIBRARY_PCT:
            report.notes.append(f"Out of library: this ECG's closest reference case is a weaker match than "
                                f"{100 - OUT_OF_LIBRARY_PCT:.0f} % of held-out ECGs drawn as pictures found; the "
                                f"similar-case votes say little about it.")
        return with_measurements(report, measurements, fill=True)

    def _measured_mi(self, evidence: "Evidence", sup: dict, diagnoses: list[Diagnosis],
                     m: dict | None) -> tuple[list[Diagnosis], list[str]]:
        """When the tracing's measurements meet the ECG criteria of MI — ST elevation meeting the STEMI criteria
        (acute) or Q waves meeting those of prior MI (age undetermined) — the report states MI and does not call
        the ECG normal, whatever the neighbours voted: real printouts of acute MIs drew "normal ECG 0.94" from
        their neighbours, and old infarcts "ST/T change" (the library's cases are z-scored PTB-XL signals, its
        acute infarcts few). Its confidence is the neighbours' MI probability raised to the MI threshold, so the
        statement is made; `basis` says a measurement made it. Returns (diagnoses, notes)."""
        if not m or m.get("error"):
            return diagnoses, []
        if m.get("stemi_criteria"):
            why = f"ST elevation meeting the STEMI criteria in {', '.join(m['stemi_criteria'])}"
            label = f"{SUPERCLASS_NAMES['MI']}, acute injury suspected: {why}"
        elif m.get("prior_mi_q_leads"):
            why = f"Q waves meeting the criteria of prior infarction in {', '.join(m['prior_mi_q_leads'])}"
            label = f"{SUPERCLASS_NAMES['MI']}, age undetermined: {why}"
        else:
            return diagnoses, []
        norm = next((d for d in diagnoses if d.superclass == "NORM" and d.code is None), None)
        kept = [d for d in diagnoses if d is not norm]
        vote = float(sup.get("MI", 0.0))
        notes = [f"The similar cases' vote for myocardial infarction was {vote:.2f}; it is stated because of the "
                 f"measured {why}."]
        if norm is not None:
            notes.append(f"Not called a normal ECG although the similar cases voted so ({norm.confidence:.2f}): "
                         "the measurement contradicts it.")
        if not any(d.superclass == "MI" and d.code is None for d in kept):
            kept.insert(0, Diagnosis(label=label, confidence=round(max(vote, self._threshold(evidence, "MI")), 4),
                                     superclass="MI", cited=[], basis="measured"))
        return kept, notes

    def _impression(self, ns: list["Neighbour"], diagnoses: list[Diagnosis]) -> Statement | None:
        if not ns:
            return None
        top = ns[: self.config.impression_cases]  # `ns` is ranked (see compose)
        quotes = "; ".join(f"[case {n.case_id}] \u201c{_excerpt(n.report, self.config.quote_chars)}\u201d "
                           f"(similarity {similarity_text(n.score, n.similarity_pct)})" for n in top)
        labels = ", ".join(f"{d.label} ({d.confidence:.2f})" for d in diagnoses
                           if d.code is None and d.basis == "votes")
        measured = "".join(f"Measured: {d.label}. " for d in diagnoses if d.basis == "measured")
        supported = measured + (f"Similar-case votes support: {labels}. " if labels
                                else "No similar-case label is stated. ")
        return Statement(f"{supported}The most similar reference cases were reported as: {quotes}.",
                         [n.case_id for n in top])


def _excerpt(text: str, max_chars: int) -> str:
    s = " ".join((text or "").split()).replace("[", "(").replace("]", ")") or "no report text"
    return s if len(s) <= max_chars else s[: max_chars - 1].rstrip() + "…"
