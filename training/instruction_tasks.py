"""The question families of the instruction set (ECGInstruct's four) and their phrasing: for one case, a
question and an answer taken from its own coded labels or signal, or None when the case cannot answer."""
from __future__ import annotations

import random
from collections.abc import Iterable

from rag_ecg.data.labels import SUPERCLASS_NAMES
from training.instruction_cases import CaseInfo, Vocabulary, present_codes
from training.instruction_config import InstructionConfig

INFARCT_TERRITORY = {  # MI statement -> territory words (from the SCP-ECG descriptions)
    "IMI": "inferior", "ASMI": "anteroseptal", "ILMI": "inferolateral", "AMI": "anterior",
    "ALMI": "anterolateral", "LMI": "lateral", "IPLMI": "inferoposterolateral", "IPMI": "inferoposterior",
    "PMI": "posterior", "INJAS": "anteroseptal (subendocardial injury)",
    "INJAL": "anterolateral (subendocardial injury)", "INJIN": "inferior (subendocardial injury)",
    "INJLA": "lateral (subendocardial injury)", "INJIL": "inferolateral (subendocardial injury)",
}


# ----------------------------------------------------------------------------------------------- phrasing

Q = {
    "superclass_mc": [
        "Which of the following diagnostic categories applies to this ECG?",
        "Look at this 12-lead ECG. Which one of these categories is present?",
        "Based on the ECG image, select the diagnostic class that fits.",
        "Which diagnostic superclass does this electrocardiogram belong to? Choose one option.",
        "From the options below, which finding category is shown in this ECG?",
    ],
    "superclass_yesno": [
        "Does this ECG show {name}? Answer yes or no.",
        "Is there evidence of {name} on this 12-lead ECG?",
        "Would you classify this tracing as showing {name}? Reply yes or no.",
        "Based on the image, is {name} present?",
        "Yes or no: this electrocardiogram shows {name}.",
    ],
    "normal_yesno": [
        "Is this a normal ECG? Answer yes or no.",
        "Is this electrocardiogram within normal limits?",
        "Would you call this 12-lead ECG normal? Reply yes or no.",
    ],
    "superclass_list": [
        "List all diagnostic superclasses (NORM, MI, STTC, CD, HYP) that apply to this ECG.",
        "Which of the PTB-XL diagnostic classes NORM, MI, STTC, CD and HYP apply here? Name all that apply.",
        "Classify this ECG into the five PTB-XL superclasses; give every class that is present.",
    ],
    "scp_mc": [
        "Which of the following diagnostic statements best describes this ECG?",
        "Choose the diagnosis supported by this ECG image.",
        "Which one of these diagnoses is present on the tracing?",
        "Select the correct diagnostic statement for this electrocardiogram.",
    ],
    "scp_yesno": [
        "Does this ECG show {name}? Answer yes or no.",
        "Is {name} present on this tracing?",
        "Can {name} be diagnosed from this ECG? Yes or no.",
        "Check the ECG: is there {name}?",
    ],
    "rhythm_mc": [
        "What is the rhythm of this ECG?",
        "Identify the cardiac rhythm shown in this 12-lead ECG.",
        "Which rhythm does this tracing show?",
        "Determine the underlying rhythm from the ECG image.",
        "What rhythm statement applies to this electrocardiogram?",
    ],
    "rhythm_yesno": [
        "Is the rhythm {name}? Answer yes or no.",
        "Does this ECG show {name}?",
        "Yes or no: the rhythm on this tracing is {name}.",
        "Would you describe the rhythm as {name}?",
    ],
    "rate_value": [
        "What is the ventricular heart rate on this ECG?",
        "Estimate the heart rate in beats per minute.",
        "How fast is the heart beating on this tracing?",
        "Measure the heart rate from the R-R intervals.",
        "Approximately what is the heart rate shown in this ECG?",
    ],
    "rate_category": [
        "Is the heart rate normal, too slow (bradycardia) or too fast (tachycardia)?",
        "Classify the ventricular rate: bradycardic, normal or tachycardic?",
        "Is the heart rate on this ECG within the normal range of 60-100 bpm?",
    ],
    "form_mc": [
        "Which of the following morphological findings is present on this ECG?",
        "Which waveform abnormality can be seen in this tracing?",
        "Select the finding that describes the morphology of this ECG.",
        "Look at the P waves, QRS complexes, ST segments and T waves. Which finding is present?",
    ],
    "form_yesno": [
        "Are there {name} on this ECG? Answer yes or no.",
        "Does the tracing show {name}?",
        "Yes or no: this ECG has {name}.",
        "Inspect the waveforms: is there evidence of {name}?",
    ],
    "form_describe": [
        "Describe the morphological findings of this ECG.",
        "What abnormalities of the P-QRS-T morphology does this ECG show?",
        "Comment on the ST segments, T waves and QRS morphology of this tracing.",
    ],
    "mi_territory": [
        "This ECG shows a myocardial infarction. In which territory is it located?",
        "Where is the infarction on this ECG located?",
        "Which myocardial region is affected by the infarction seen here?",
    ],
    "report_english": [
        "Write a complete report for this 12-lead ECG.",
        "Interpret this ECG and write the report a cardiologist would write.",
        "Provide a full interpretation of this electrocardiogram: rhythm, rate, findings and diagnosis.",
        "Generate a clinical ECG report for this image.",
        "Please read this ECG and summarise all findings in a report.",
    ],
    "report_original": [
        "Write the report for this ECG in the style of the original reader (as recorded in the database).",
        "Reproduce the original machine/physician report for this ECG, in its original language.",
        "What did the original report of this ECG say? Write it in the language of the source.",
    ],
}
LETTERS = "ABCDEFGH"


def _yes(rng: random.Random, name: str) -> str:
    return rng.choice([f"Yes. The ECG shows {name}.", f"Yes, there is evidence of {name}.",
                       f"Yes - {name} can be seen on this ECG."])


def _no(rng: random.Random, name: str) -> str:
    return rng.choice([f"No. The ECG does not show {name}.", f"No, there is no evidence of {name}.",
                       f"No - {name} cannot be seen on this ECG."])


def _mc(rng: random.Random, question: str, correct: str, distractors: list[str], n: int) -> tuple[str, str, dict]:
    """A lettered multiple-choice question with one correct option; answer '(B) text'."""
    opts = [correct] + rng.sample(distractors, min(n - 1, len(distractors)))
    rng.shuffle(opts)
    k = opts.index(correct)
    body = question + "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts))
    body += "\nAnswer with the letter and the option text."
    return body, f"({LETTERS[k]}) {correct}", {"options": opts, "correct_option": LETTERS[k]}


# -------------------------------------------------------------------------------------- question generators
class Generator:
    """Builds (question, answer, meta) for one case and family; None when the case cannot answer it."""

    def __init__(self, vocab: Vocabulary, cfg: InstructionConfig):
        self.v, self.cfg = vocab, cfg
        self.diag = set(vocab.diagnostic)

    def desc(self, code: str) -> str:
        return self.v.descriptions.get(code, code)

    def present(self, case: CaseInfo, codes: Iterable[str]) -> list[str]:
        return present_codes(case, codes, self.cfg.min_likelihood, self.diag)

    def absent(self, case: CaseInfo, codes: Iterable[str]) -> list[str]:
        return [c for c in codes if c not in case.codes]

    def make(self, family: str, case: CaseInfo, rng: random.Random) -> tuple[str, str, dict] | None:
        kinds = {"classification": [self.superclass_mc, self.superclass_yesno, self.superclass_list,
                                    self.scp_mc, self.scp_yesno],
                 "rhythm": [self.rhythm_mc, self.rhythm_yesno, self.rate_value, self.rate_category],
                 "morphology": [self.form_mc, self.form_yesno, self.form_describe, self.mi_territory],
                 "report": [self.report]}[family]
        for fn in rng.sample(kinds, len(kinds)):  # a random applicable question type
            out = fn(case, rng)
            if out is not None:
                q, a, meta = out
                return q, a, {"question_type": fn.__name__, **meta}
        return None

    # classification
    def superclass_mc(self, case, rng):
        pos = [s for s in case.labels if s in SUPERCLASS_NAMES]
        neg = [s for s in SUPERCLASS_NAMES if s not in case.labels]
        if not pos or not neg:
            return None
        c = rng.choice(pos)
        names = {f"{SUPERCLASS_NAMES[s]} ({s})": s for s in SUPERCLASS_NAMES}
        q, a, meta = _mc(rng, rng.choice(Q["superclass_mc"]), f"{SUPERCLASS_NAMES[c]} ({c})",
                         [f"{SUPERCLASS_NAMES[s]} ({s})" for s in neg], self.cfg.mc_options)
        return q, a, {**meta, "option_labels": [names[o] for o in meta["options"]], "target": c}

    def superclass_yesno(self, case, rng):
        if not case.labels:
            return None
        yes = rng.random() < 0.5
        pool = [s for s in SUPERCLASS_NAMES if (s in case.labels) == yes]
        if not pool:
            return None
        s = rng.choice(pool)
        if s == "NORM":
            ans = (rng.choice(["Yes, this is a normal ECG.", "Yes. The ECG is within normal limits."]) if yes else
                   rng.choice(["No, this ECG is not normal.", "No. The ECG is abnormal."]))
            return rng.choice(Q["normal_yesno"]), ans, {"target": s, "expected": yes}
        name = SUPERCLASS_NAMES[s]
        ans = _yes(rng, name) if yes else _no(rng, name)
        return rng.choice(Q["superclass_yesno"]).format(name=name), ans, {"target": s, "expected": yes}

    def superclass_list(self, case, rng):
        labs = [s for s in SUPERCLASS_NAMES if s in case.labels]
        if not labs:
            return None
        ans = "; ".join(f"{s} ({SUPERCLASS_NAMES[s]})" for s in labs) + "."
        return rng.choice(Q["superclass_list"]), ans, {"targets": labs}

    def scp_mc(self, case, rng):
        pos = self.present(case, self.v.diagnostic)
        neg = self.absent(case, self.v.diagnostic)
        if not pos or not neg:
            return None
        c = rng.choice(pos)
        q, a, meta = _mc(rng, rng.choice(Q["scp_mc"]), self.desc(c), [self.desc(x) for x in neg],
                         self.cfg.mc_options)
        return q, a, {**meta, "target": c}

    def scp_yesno(self, case, rng):
        yes = rng.random() < 0.5
        pool = self.present(case, self.v.diagnostic) if yes else self.absent(case, self.v.diagnostic)
        if not pool:
            return None
        c = rng.choice(pool)
        name = self.desc(c)
        return (rng.choice(Q["scp_yesno"]).format(name=name), _yes(rng, name) if yes else _no(rng, name),
                {"target": c, "expected": yes})

    # rhythm
    def rhythm_mc(self, case, rng):
        pos = self.present(case, self.v.rhythm)
        neg = self.absent(case, self.v.rhythm)
        if len(pos) != 1 or not neg:  # one rhythm statement: the answer is unambiguous
            return None
        q, a, meta = _mc(rng, rng.choice(Q["rhythm_mc"]), self.desc(pos[0]), [self.desc(x) for x in neg],
                         self.cfg.mc_options)
        return q, a, {**meta, "target": pos[0]}

    def rhythm_yesno(self, case, rng):
        pos = self.present(case, self.v.rhythm)
        if not pos:
            return None
        yes = rng.random() < 0.5
        pool = pos if yes else self.absent(case, self.v.rhythm)
        if not pool:
            return None
        c = rng.choice(pool)
        name = self.desc(c)
        return (rng.choice(Q["rhythm_yesno"]).format(name=name), _yes(rng, name) if yes else _no(rng, name),
                {"target": c, "expected": yes})

    @staticmethod
    def rate_category_of(bpm: float) -> str:
        return "bradycardia" if bpm < 60 else ("tachycardia" if bpm > 100 else "normal")

    SINUS_RATE = {"SR": "normal", "STACH": "tachycardia", "SBRAD": "bradycardia"}

    def rate_ok(self, case) -> bool:
        """A measured rate that agrees with the coded sinus rhythm (SR 60-100, STACH > 100, SBRAD < 60
        bpm); when they disagree the detector or the code is off, and the case gets no rate statement."""
        if case.rate_bpm is None:
            return False
        cat = self.rate_category_of(int(round(case.rate_bpm)))
        coded = {self.SINUS_RATE[c] for c in case.codes if c in self.SINUS_RATE}
        return not coded or coded == {cat}

    def rate_value(self, case, rng):
        if not self.rate_ok(case):
            return None
        bpm = int(round(case.rate_bpm))
        cat = self.rate_category_of(bpm)
        tail = {"normal": "within the normal range", "bradycardia": "slow (bradycardia)",
                "tachycardia": "fast (tachycardia)"}[cat]
        ans = rng.choice([f"The ventricular rate is about {bpm} beats per minute, {tail}.",
                          f"About {bpm} bpm ({tail}).",
                          f"Heart rate approximately {bpm} bpm, which is {tail}."])
        return rng.choice(Q["rate_value"]), ans, {"rate_bpm": bpm, "category": cat}

    def rate_category(self, case, rng):
        if not self.rate_ok(case):
            return None
        bpm = int(round(case.rate_bpm))
        cat = self.rate_category_of(bpm)
        ans = {"normal": f"Normal: the rate is about {bpm} bpm, within 60-100 bpm.",
               "bradycardia": f"Too slow: about {bpm} bpm, which is bradycardia (below 60 bpm).",
               "tachycardia": f"Too fast: about {bpm} bpm, which is tachycardia (above 100 bpm)."}[cat]
        return rng.choice(Q["rate_category"]), ans, {"rate_bpm": bpm, "category": cat}

    # morphology
    def form_mc(self, case, rng):
        pos = self.present(case, self.v.form)
        neg = self.absent(case, self.v.form)
        if not pos or not neg:
            return None
        c = rng.choice(pos)
        q, a, meta = _mc(rng, rng.choice(Q["form_mc"]), self.desc(c), [self.desc(x) for x in neg],
                         self.cfg.mc_options)
        return q, a, {**meta, "target": c}

    def form_yesno(self, case, rng):
        pos = self.present(case, self.v.form)
        yes = bool(pos) and rng.random() < 0.5
        pool = pos if yes else self.absent(case, self.v.form)
        if not pool:
            return None
        c = rng.choice(pool)
        name = self.desc(c)
        return (rng.choice(Q["form_yesno"]).format(name=name), _yes(rng, name) if yes else _no(rng, name),
                {"target": c, "expected": yes})

    def form_describe(self, case, rng):
        pos = self.present(case, self.v.form)
        if pos:
            ans = "Morphological findings: " + "; ".join(self.desc(c) for c in pos) + "."
        elif case.labels == ["NORM"]:
            ans = "No abnormal P-QRS-T morphology: the waveforms are within normal limits."
        else:
            return None  # an abnormal ECG without coded form statements: we cannot say what it shows
        return rng.choice(Q["form_describe"]), ans, {"targets": pos}

    def mi_territory(self, case, rng):
        mi = [c for c in self.present(case, self.v.diagnostic) if c in INFARCT_TERRITORY]
        if not mi:
            return None
        terr = "; ".join(f"{INFARCT_TERRITORY[c]} ({self.desc(c)})" for c in mi)
        return rng.choice(Q["mi_territory"]), f"The infarction is {terr}.", {"targets": mi}

    # report
    def english_report(self, case: CaseInfo) -> str:
        """Rhythm, rate, diagnostic statements (with their coded certainty), form statements, classes."""
        parts = []
        rhythm = self.present(case, self.v.rhythm)
        if rhythm:
            parts.append("Rhythm: " + ", ".join(self.desc(c) for c in rhythm) + ".")
        if self.rate_ok(case):
            parts.append(f"Ventricular rate about {int(round(case.rate_bpm))} bpm.")
        diag = []
        for c in sorted(self.present(case, self.v.diagnostic), key=lambda c: (-float(case.codes[c] or 0), c)):
            lk = float(case.codes[c] or 0)
            qual = "" if lk >= 100 or lk == 0 else ("probable " if lk >= 80 else "possible ")
            diag.append(qual + self.desc(c))
        if diag:
            parts.append("Diagnosis: " + "; ".join(diag) + ".")
        form = [self.desc(c) for c in self.present(case, self.v.form) if c not in self.diag]
        if form:
            parts.append("Findings: " + "; ".join(form) + ".")
        labs = [f"{s} ({SUPERCLASS_NAMES[s]})" for s in SUPERCLASS_NAMES if s in case.labels]
        if labs:
            parts.append("Diagnostic class: " + ", ".join(labs) + ".")
        return " ".join(parts)

    def report(self, case, rng):
        original = bool(case.report.strip()) and rng.random() < self.cfg.original_report_share
        if original:
            return rng.choice(Q["report_original"]), case.report.strip(), {"question_type_detail": "original"}
        text = self.english_report(case)
        if not text:
            return None
        return rng.choice(Q["report_english"]), text, {"question_type_detail": "english"}

