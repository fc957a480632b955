"""Instruction data for the LLM fine-tune: case store + rendered pages -> LLaVA-format JSONL (train / val).

Why: PULSE learned to read ECG images from ECGInstruct's four task families; rag-ecg also needs the model
to use retrieved cases as evidence. Every answer here comes from the case's own coded labels (or its own
signal, for the rate), never from a model, so it can be checked. A configurable share of samples shows the
retrieved-case evidence block exactly as `rag_ecg.reader.prompts.format_evidence` builds it at inference.

Task families (ECGInstruct's four):
  classification - multiple choice / yes-no / list on PTB-XL superclasses and diagnostic SCP statements
  rhythm         - rhythm statement (multiple choice, yes-no) and ventricular rate from the R-R intervals
  morphology     - form statements (ST-T, Q waves, ...) and the infarct territory
  report         - an English report composed from the SCP statements; or the original (mostly German) one

Honest choices (see the report of issue 7):
- Splits follow PTB-XL's folds (train 1-8, val 9); cases without a fold (LUDB) are not used.
- Evidence neighbours never share the sample's patient (nor are the case itself) and always come from the
  train split, so no label of a val case or of the same patient reaches a prompt. They come from a real
  retriever: a built index (`index_dir`), a trained encoder (`encoder_dir`: nearest pages by cosine), or a
  given `retrieve(case) -> Evidence`. Without one, evidence samples are refused: random or label-matched
  "neighbours" would teach the model to trust evidence that retrieval cannot deliver.
- Amplitude statements (LVOLT, HVOLT, VCLVH) are left out: the shared PTB-XL signals are z-scored per lead,
  so their pages cannot show absolute voltage. Diagnostic statements coded below `min_likelihood` are
  neither asked as present nor used as absent distractors.

Layout of `out_dir`: train.jsonl, val.jsonl, images/<case>-<preset>-<dpi>dpi-s<seed>.png (one per case,
shared by all its samples), manifest.json (counts per split/task/question type, evidence, skipped cases).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from rag_ecg.data.labels import SUPERCLASS_NAMES

FAMILIES = ("classification", "rhythm", "morphology", "report")
AMPLITUDE_CODES = ("LVOLT", "HVOLT", "VCLVH")
INFARCT_TERRITORY = {  # MI statement -> territory words (from the SCP-ECG descriptions)
    "IMI": "inferior", "ASMI": "anteroseptal", "ILMI": "inferolateral", "AMI": "anterior",
    "ALMI": "anterolateral", "LMI": "lateral", "IPLMI": "inferoposterolateral", "IPMI": "inferoposterior",
    "PMI": "posterior", "INJAS": "anteroseptal (subendocardial injury)",
    "INJAL": "anterolateral (subendocardial injury)", "INJIN": "inferior (subendocardial injury)",
    "INJLA": "lateral (subendocardial injury)", "INJIL": "inferolateral (subendocardial injury)",
}


@dataclass
class InstructionConfig:
    """How the instruction set is built; saved in the manifest."""

    db_url: str | None = None  # case store URL; None = the default store (RAG_ECG_DB or data/rag_ecg.db)
    out_dir: str = "data/instructions"  # where train.jsonl, val.jsonl, images/ and manifest.json go
    sources: list[str] = field(default_factory=lambda: ["ptbxl"])  # case sources used
    train_folds: list[int] = field(default_factory=lambda: list(range(1, 9)))  # PTB-XL folds for training
    val_folds: list[int] = field(default_factory=lambda: [9])  # PTB-XL folds for validation
    limit: int | None = None  # at most this many cases (lowest ids first); None = all
    seed: int = 0  # question choice, phrasing, render preset/seed, evidence share
    samples_per_family: dict[str, int] = field(
        default_factory=lambda: {f: 1 for f in FAMILIES})  # samples per case and task family
    original_report_share: float = 0.25  # share of report samples asking for the original report text
    evidence_share: float = 0.3  # share of samples whose prompt carries the retrieved-case evidence
    evidence_k: int = 5  # neighbours shown in an evidence block
    index_dir: str | None = None  # built index (index/build.py) used to retrieve evidence
    encoder_dir: str | None = None  # or: trained encoder; nearest train pages by cosine similarity
    vote_temperature: float = 0.05  # softmax temperature of the neighbours' label votes (encoder retrieval)
    render_presets: list[str] = field(
        default_factory=lambda: ["clean", "print", "scan", "photo", "random"])  # one picked per case
    dpi: int = 100  # page resolution; 100 dpi A4 = 1169 x 827 px (PULSE-7B tiles at 336 px)
    mc_options: int = 4  # options of a multiple-choice question (fewer when too few distractors exist)
    min_likelihood: float = 50.0  # diagnostic statements coded below this are uncertain: not asked
    exclude_codes: list[str] = field(default_factory=lambda: list(AMPLITUDE_CODES))  # never asked about
    workers: int = 1  # processes rendering pages (rendering is the slow part)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "InstructionConfig":
        """YAML (optional) + keyword overrides (None = keep); unknown fields are an error."""
        import yaml

        data: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"{p}: config file not found")
            data = yaml.safe_load(p.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{p}: expected a mapping of config fields")
        data.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path or 'instruction config'}: unknown field(s) {', '.join(unknown)}")
        cfg = cls(**data)
        bad = sorted(set(cfg.samples_per_family) - set(FAMILIES))
        if bad:
            raise ValueError(f"samples_per_family: unknown task family {', '.join(bad)} "
                             f"(one of {', '.join(FAMILIES)})")
        if not 0.0 <= cfg.evidence_share <= 1.0:
            raise ValueError(f"evidence_share: {cfg.evidence_share} is outside 0-1")
        if cfg.mc_options < 2:
            raise ValueError(f"mc_options: {cfg.mc_options} must be >= 2")
        return cfg


# --------------------------------------------------------------------------------------------- the case view
@dataclass
class CaseInfo:
    """What question generators need of a case (plain data: no session, picklable for workers)."""

    id: int
    source: str
    external_id: str
    patient_id: str | None
    age: float | None
    sex: str | None
    report: str
    codes: dict[str, float]
    labels: list[str]
    fold: int | None
    signal_path: str
    split: str = ""  # train | val (from the fold)
    image: str = ""  # path relative to out_dir
    rate_bpm: float | None = None  # ventricular rate from the signal's R-R intervals


@dataclass
class Vocabulary:
    """SCP statements by kind, with English descriptions, restricted to codes seen in the store."""

    descriptions: dict[str, str]
    diagnostic: list[str]
    form: list[str]
    rhythm: list[str]
    superclass_of: dict[str, str | None]

    @classmethod
    def from_store(cls, session, seen: set[str], exclude: Iterable[str]) -> "Vocabulary":
        from sqlalchemy import select

        from rag_ecg.data.store import ScpStatementRow

        ex = set(exclude)
        rows = [r for r in session.scalars(select(ScpStatementRow)) if r.code in seen and r.code not in ex]
        if not rows:
            raise ValueError("case store has no SCP statements for its cases (ingest PTB-XL first)")
        kinds = {r.code: set(r.kinds or []) for r in rows}
        return cls(descriptions={r.code: r.description for r in rows},
                   diagnostic=sorted(c for c, k in kinds.items() if "diagnostic" in k),
                   form=sorted(c for c, k in kinds.items() if "form" in k),
                   rhythm=sorted(c for c, k in kinds.items() if "rhythm" in k),
                   superclass_of={r.code: r.diagnostic_class for r in rows})


def _present(case: CaseInfo, codes: Iterable[str], min_likelihood: float, diagnostic: set[str]) -> list[str]:
    """Codes the case carries with confidence: diagnostic ones at >= min_likelihood, others (likelihood 0
    means 'not graded' for form/rhythm statements) whenever coded."""
    out = []
    for c in codes:
        if c not in case.codes:
            continue
        lk = float(case.codes[c] or 0)
        if c in diagnostic and lk < min_likelihood:
            continue
        out.append(c)
    return out


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
        return _present(case, codes, self.cfg.min_likelihood, self.diag)

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


# ------------------------------------------------------------------------------------------------ evidence
Retrieve = Callable[[object], "Evidence"]  # noqa: F821  (case -> Evidence)


def evidence_from_hits(hits: list[tuple[float, CaseInfo]], k: int, descriptions: dict[str, str],
                       temperature: float, probability=None, index_name: str = "",
                       encoder_hash: str = "", image_paths: dict[int, str] | None = None):
    """Top-k neighbours + similarity-weighted votes over them (the same vote the retriever computes)."""
    from rag_ecg.eval.metrics import vote_scores
    from rag_ecg.search.evidence import Evidence, Neighbour
    from rag_ecg.data.labels import SUPERCLASSES

    hits = hits[:k]
    labels = list(SUPERCLASSES)
    codes = sorted({c for _, h in hits for c in h.codes})
    sims = np.array([[s for s, _ in hits]], np.float64)
    sup = vote_scores(sims, np.array([[[lab in h.labels for lab in labels] for _, h in hits]], float)
                      .reshape(1, len(hits), len(labels)), temperature)[0] if hits else []
    cod = vote_scores(sims, np.array([[[c in h.codes for c in codes] for _, h in hits]], float)
                      .reshape(1, len(hits), len(codes)), temperature)[0] if hits else []
    prob = probability or (lambda lab, v: float(v))
    neigh = [Neighbour(case_id=h.id, score=float(s), source=h.source, external_id=h.external_id,
                       report=h.report, codes=dict(h.codes), labels=list(h.labels), age=h.age, sex=h.sex,
                       patient_id=h.patient_id, image_path=(image_paths or {}).get(h.id),
                       code_descriptions={c: descriptions[c] for c in h.codes if c in descriptions})
             for s, h in hits]
    return Evidence(neighbours=neigh, superclass_scores={lab: prob(lab, float(v)) for lab, v in zip(labels, sup)},
                    code_scores={c: float(v) for c, v in zip(codes, cod)}, k=k, index_name=index_name,
                    encoder_hash=encoder_hash)


def _admissible(case: CaseInfo, other: CaseInfo | None) -> bool:
    """A neighbour may be shown: a train case, not this case, not this patient."""
    return (other is not None and other.id != case.id and other.split == "train"
            and not (case.patient_id is not None and other.patient_id == case.patient_id))


def encoder_retriever(encoder_dir: str | Path, cases: dict[int, CaseInfo], out_dir: Path,
                      cfg: InstructionConfig, descriptions: dict[str, str], log=print) -> Retrieve:
    """Nearest train pages by the trained encoder's cosine similarity (exact search over the train split)."""
    from PIL import Image

    from rag_ecg.encoder.model import ECGEncoder

    enc = ECGEncoder.load(encoder_dir)
    lib = [c for c in cases.values() if c.split == "train"]
    if not lib:
        raise ValueError("encoder retrieval: no train cases to retrieve from")

    def pages(cs):
        for c in cs:
            with Image.open(out_dir / c.image) as im:
                yield im.convert("RGB")

    log(f"embedding {len(lib)} train pages with {encoder_dir} for evidence retrieval")
    lib_emb = enc.embed_images(pages(lib), strict=False)  # (n_train, d), L2-normalised
    row = {c.id: i for i, c in enumerate(lib)}
    q_cache: dict[int, np.ndarray] = {}

    def retrieve(case) -> "Evidence":  # noqa: F821
        c = cases[case.id]
        q = lib_emb[row[c.id]] if c.id in row else q_cache.setdefault(c.id, enc.embed_images(pages([c]), strict=False)[0])
        sims = lib_emb @ q
        order = np.argsort(-sims, kind="stable")
        hits = []
        for i in order:
            if _admissible(c, lib[i]):
                hits.append((float(sims[i]), lib[i]))
                if len(hits) >= cfg.evidence_k:
                    break
        return evidence_from_hits(hits, cfg.evidence_k, descriptions, cfg.vote_temperature,
                                  index_name=f"encoder:{Path(encoder_dir).name}", encoder_hash=enc.checkpoint_hash)

    return retrieve


def index_retriever(index_dir: str | Path, store, cases: dict[int, CaseInfo], out_dir: Path,
                    cfg: InstructionConfig, descriptions: dict[str, str]) -> Retrieve:
    """A built index (rag_ecg.search.retrieve.Retriever): the case's page as the query, then our admissibility."""
    from PIL import Image

    from rag_ecg.search.retrieve import Retriever

    r = Retriever.open(index_dir, store)
    cal = r.calibration

    def retrieve(case) -> "Evidence":  # noqa: F821
        c = cases[case.id]
        with Image.open(out_dir / c.image) as im:
            page = im.convert("RGB")
        want = cfg.evidence_k * 4 + 16
        while True:
            ev = r.search_images([page], k=want, exclude_patients=[c.patient_id])[0]
            hits = [(n.score, cases.get(n.case_id)) for n in ev.neighbours]
            hits = [(s, h) for s, h in hits if _admissible(c, h)]
            if len(hits) >= cfg.evidence_k or len(ev.neighbours) < want:
                break
            want *= 4
        voters = hits[: max(cfg.evidence_k, cal.k)]
        full = evidence_from_hits(voters, len(voters), descriptions, cal.temperature, cal.probability,
                                  index_name=r.name, encoder_hash=r.encoder.checkpoint_hash)
        full.neighbours, full.k = full.neighbours[: cfg.evidence_k], cfg.evidence_k
        return full

    return retrieve


def check_evidence(case: CaseInfo, evidence, cases: dict[int, CaseInfo]) -> None:
    """Refuse leakage from any retriever: same case, same patient, a val case, or a case outside the store."""
    for n in evidence.neighbours:
        other = cases.get(int(n.case_id))
        if other is None:
            raise ValueError(f"retrieve(case {case.id}) returned case {n.case_id}, which is not a usable case")
        if other.id == case.id or (case.patient_id is not None and other.patient_id == case.patient_id):
            raise ValueError(f"retrieve(case {case.id}) returned case {other.id} of the same patient "
                             f"{case.patient_id}: evidence would leak the answer")
        if other.split != "train":
            raise ValueError(f"retrieve(case {case.id}) returned case {other.id} from the {other.split} "
                             "split: evidence must come from training cases only")


def citation_sentence(case: CaseInfo, evidence) -> str:
    """Which retrieved cases share the case's own diagnostic classes (true by construction), cited by id."""
    agree = [n for n in evidence.neighbours if set(n.labels) & set(case.labels)]
    if not agree:
        return "None of the retrieved reference cases shares these diagnostic classes."
    cites = ", ".join(f"[case {n.case_id}] ({'/'.join(sorted(set(n.labels) & set(case.labels)))})"
                      for n in agree)
    return f"Retrieved reference cases with the same diagnostic class: {cites}."


# -------------------------------------------------------------------------------------------------- render
def _render_one(args: tuple) -> tuple[int, float | None, str | None]:
    """Worker: load the case's signal, write its page (once), measure its rate. -> (id, bpm, error)."""
    info, path, preset, seed, dpi = args
    from rag_ecg.data.records import STANDARD_LEADS
    from rag_ecg.paper.render import atomic_save_image, estimate_heart_rate, render_page
    from rag_ecg.data.store import Case, load_case_record

    try:
        case = Case(id=info.id, source=info.source, external_id=info.external_id, patient_id=info.patient_id,
                    age=info.age, sex=info.sex, report=info.report, codes=info.codes, labels=info.labels,
                    fold=info.fold, signal_path=info.signal_path)
        rec = load_case_record(case)
        if not Path(path).exists():
            atomic_save_image(render_page(rec, preset=preset, seed=seed, dpi=dpi), Path(path))
        lead = rec.leads.index("II") if "II" in rec.leads else STANDARD_LEADS.index("II")
        return info.id, estimate_heart_rate(rec.signal_mv()[:, lead], rec.fs), None
    except Exception as exc:  # a bad record is skipped with its reason, not fatal for the whole set
        return info.id, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def render_pages(cases: list[CaseInfo], out_dir: Path, cfg: InstructionConfig, log=print) -> dict[int, str]:
    """Pick a preset per case (seeded), render missing pages, fill `rate_bpm`; returns {case id: error}."""
    jobs = []
    for c in cases:
        rng = random.Random(f"{cfg.seed}:render:{c.id}")
        preset = rng.choice(cfg.render_presets)
        seed = rng.randrange(2**31)
        c.image = f"images/{c.id}-{preset}-{cfg.dpi}dpi-s{seed}.png"
        jobs.append((c, str(out_dir / c.image), preset, seed, cfg.dpi))
    by_id = {c.id: c for c in cases}
    errors: dict[int, str] = {}
    if cfg.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cfg.workers) as ex:
            results = list(ex.map(_render_one, jobs, chunksize=8))
    else:
        results = [_render_one(j) for j in jobs]
    for cid, bpm, err in results:
        if err:
            errors[cid] = err
        else:
            by_id[cid].rate_bpm = bpm
    log(f"rendered/checked {len(jobs)} pages ({len(errors)} failed)")
    return errors


# ---------------------------------------------------------------------------------------------------- build
def load_cases(store, cfg: InstructionConfig) -> tuple[list[CaseInfo], Vocabulary]:
    from sqlalchemy import select

    from rag_ecg.data.store import Case

    folds = {f: "train" for f in cfg.train_folds} | {f: "val" for f in cfg.val_folds}
    with store.session() as s:
        q = select(Case).where(Case.source.in_(cfg.sources), Case.fold.in_(sorted(folds))).order_by(Case.id)
        if cfg.limit:
            q = q.limit(cfg.limit)
        rows = list(s.scalars(q))
        cases = [CaseInfo(id=c.id, source=c.source, external_id=c.external_id, patient_id=c.patient_id,
                          age=c.age, sex=c.sex, report=c.report or "", codes=dict(c.codes or {}),
                          labels=list(c.labels or []), fold=c.fold, signal_path=c.signal_path,
                          split=folds[c.fold]) for c in rows]
        if not cases:
            raise ValueError(f"{store!r}: no {'/'.join(cfg.sources)} cases in folds {sorted(folds)} "
                             "(run `python cli.py ingest` first)")
        vocab = Vocabulary.from_store(s, {code for c in cases for code in c.codes}, cfg.exclude_codes)
    return cases, vocab


def build(cfg: InstructionConfig, retrieve: Retrieve | None = None, log=print) -> Path:
    """Write the instruction set described by `cfg`; returns the manifest path."""
    from rag_ecg.reader.prompts import format_evidence
    from rag_ecg.data.store import open_store, scp_descriptions

    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.db_url)
    try:
        cases, vocab = load_cases(store, cfg)
        with store.session() as s:
            descriptions = scp_descriptions(s)
        log(f"{len(cases)} cases ({sum(c.split == 'train' for c in cases)} train, "
            f"{sum(c.split == 'val' for c in cases)} val)")
        errors = render_pages(cases, out, cfg, log)
        ok = [c for c in cases if c.id not in errors]
        by_id = {c.id: c for c in ok}
        retriever_kind = "given" if retrieve is not None else None
        if cfg.evidence_share > 0 and retrieve is None:
            if cfg.index_dir:
                retrieve, retriever_kind = index_retriever(cfg.index_dir, store, by_id, out, cfg, descriptions), \
                    f"index:{cfg.index_dir}"
            elif cfg.encoder_dir:
                retrieve, retriever_kind = encoder_retriever(cfg.encoder_dir, by_id, out, cfg, descriptions, log), \
                    f"encoder:{cfg.encoder_dir}"
            else:
                raise ValueError(f"evidence_share={cfg.evidence_share} needs a retriever: give index_dir (a built "
                                 "index) or encoder_dir (a trained encoder), or set evidence_share 0")

        gen = Generator(vocab, cfg)
        samples: dict[str, list[dict]] = {"train": [], "val": []}
        counts: dict = {sp: {"cases": 0, "samples": 0, "with_evidence": 0, "tasks": {}, "question_types": {}}
                        for sp in samples}
        unanswerable: dict[str, int] = {}
        for c in ok:
            counts[c.split]["cases"] += 1
            evidence = None
            for family in FAMILIES:
                for j in range(int(cfg.samples_per_family.get(family, 0))):
                    rng = random.Random(f"{cfg.seed}:{c.id}:{family}:{j}")
                    made = gen.make(family, c, rng)
                    if made is None:
                        unanswerable[family] = unanswerable.get(family, 0) + 1
                        continue
                    question, answer, meta = made
                    prompt, ev_ids = question, []
                    if retrieve is not None and rng.random() < cfg.evidence_share:
                        if evidence is None:
                            evidence = retrieve(c)
                            check_evidence(c, evidence, by_id)
                        prompt = format_evidence(evidence) + "\n\n" + question
                        ev_ids = [int(n.case_id) for n in evidence.neighbours]
                        if family == "report" and meta.get("question_type_detail") == "english":
                            answer = answer + " " + citation_sentence(c, evidence)
                    samples[c.split].append({
                        "id": f"{c.id}-{family}-{j}", "image": c.image,
                        "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                          {"from": "gpt", "value": answer}],
                        "task": family, "case_id": c.id, "source": c.source, "external_id": c.external_id,
                        "patient_id": c.patient_id, "split": c.split, "evidence_case_ids": ev_ids, **meta})
                    cs = counts[c.split]
                    cs["samples"] += 1
                    cs["with_evidence"] += bool(ev_ids)
                    cs["tasks"][family] = cs["tasks"].get(family, 0) + 1
                    cs["question_types"][meta["question_type"]] = cs["question_types"].get(meta["question_type"], 0) + 1
        files = {}
        for split, rows in samples.items():
            path = out / f"{split}.jsonl"
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
            _atomic_bytes(path, data)
            files[f"{split}.jsonl"] = {"samples": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "config": dataclasses.asdict(cfg), "files": files, "counts": counts,
            "unanswerable_by_family": unanswerable, "retriever": retriever_kind,
            "skipped_cases": {str(k): v for k, v in errors.items()},
            "images": len({c.image for c in ok}), "versions": _versions(),
        }
        mpath = out / "manifest.json"
        _atomic_bytes(mpath, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
        log(f"train {counts['train']['samples']} / val {counts['val']['samples']} samples -> {out}")
        return mpath
    finally:
        store.dispose()


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("rag-ecg", "numpy", "pillow", "sqlalchemy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def main(config_path: Path | None = None, db_url: str | None = None, out_dir: Path | None = None,
         index_dir: Path | None = None, encoder_dir: Path | None = None, limit: int | None = None,
         seed: int | None = None, evidence_share: float | None = None, dpi: int | None = None,
         workers: int | None = None, retrieve: Retrieve | None = None, log=print) -> Path:
    """Entry point for `cli.py build-instructions`; returns the manifest path (beside train/val.jsonl)."""
    cfg = InstructionConfig.load(config_path, db_url=db_url, out_dir=str(out_dir) if out_dir else None,
                                 index_dir=str(index_dir) if index_dir else None,
                                 encoder_dir=str(encoder_dir) if encoder_dir else None, limit=limit,
                                 seed=seed, evidence_share=evidence_share, dpi=dpi, workers=workers)
    return build(cfg, retrieve=retrieve, log=log)


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Build LLaVA-format instruction data from the case store.")
    ap.add_argument("--config", type=Path, help="YAML with InstructionConfig fields")
    ap.add_argument("--db-url", help="case store URL (default: RAG_ECG_DB or data/rag_ecg.db)")
    ap.add_argument("--out-dir", type=Path, help="output folder (default data/instructions)")
    ap.add_argument("--index-dir", type=Path, help="built index used to retrieve evidence")
    ap.add_argument("--encoder-dir", type=Path, help="trained encoder used to retrieve evidence (no index)")
    ap.add_argument("--limit", type=int, help="at most this many cases")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--evidence-share", type=float, help="share of samples with evidence (0 = none)")
    ap.add_argument("--dpi", type=int)
    ap.add_argument("--workers", type=int)
    a = ap.parse_args(argv)
    return main(a.config, a.db_url, a.out_dir, a.index_dir, a.encoder_dir, a.limit, a.seed, a.evidence_share,
                a.dpi, a.workers)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(_cli(sys.argv[1:]))
