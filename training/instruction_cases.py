"""The instruction builder's view of the case store: cases as plain picklable records, the SCP vocabulary seen
in them, and each case's page rendered once (with its ventricular rate measured off the signal)."""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from rag_ecg.data.images import save_image
from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.data.store import Case, ScpStatementRow, load_case_record
from rag_ecg.errors import InputError
from rag_ecg.paper.header import estimate_heart_rate
from rag_ecg.paper.render import render_page
from training.instruction_config import InstructionConfig

log = logging.getLogger(__name__)


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
    def from_store(cls, session, seen: set[str], exclude: Iterable[str]) -> Vocabulary:
        ex = set(exclude)
        rows = [r for r in session.scalars(select(ScpStatementRow)) if r.code in seen and r.code not in ex]
        if not rows:
            raise InputError("case store has no SCP statements for its cases (ingest PTB-XL first)")
        kinds = {r.code: set(r.kinds or []) for r in rows}
        return cls(descriptions={r.code: r.description for r in rows},
                   diagnostic=sorted(c for c, k in kinds.items() if "diagnostic" in k),
                   form=sorted(c for c, k in kinds.items() if "form" in k),
                   rhythm=sorted(c for c, k in kinds.items() if "rhythm" in k),
                   superclass_of={r.code: r.diagnostic_class for r in rows})


def present_codes(case: CaseInfo, codes: Iterable[str], min_likelihood: float, diagnostic: set[str]) -> list[str]:
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


def _render_one(args: tuple) -> tuple[int, float | None, str | None]:
    """Worker: load the case's signal, write its page (once), measure its rate. -> (id, bpm, error)."""
    info, path, preset, seed, dpi = args
    try:
        case = Case(id=info.id, source=info.source, external_id=info.external_id, patient_id=info.patient_id,
                    age=info.age, sex=info.sex, report=info.report, codes=info.codes, labels=info.labels,
                    fold=info.fold, signal_path=info.signal_path)
        rec = load_case_record(case)
        if not Path(path).exists():
            save_image(render_page(rec, preset=preset, seed=seed, dpi=dpi), Path(path))
        lead = rec.leads.index("II") if "II" in rec.leads else STANDARD_LEADS.index("II")
        return info.id, estimate_heart_rate(rec.signal_mv()[:, lead], rec.fs), None
    except Exception as exc:  # a bad record is skipped with its reason, not fatal for the whole set
        return info.id, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def render_pages(cases: list[CaseInfo], out_dir: Path, cfg: InstructionConfig) -> dict[int, str]:
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
        with ProcessPoolExecutor(cfg.workers) as ex:
            results = list(ex.map(_render_one, jobs, chunksize=8))
    else:
        results = [_render_one(j) for j in jobs]
    for cid, bpm, err in results:
        if err:
            errors[cid] = err
        else:
            by_id[cid].rate_bpm = bpm
    log.info(f"rendered/checked {len(jobs)} pages ({len(errors)} failed)")
    return errors


def load_cases(store, cfg: InstructionConfig) -> tuple[list[CaseInfo], Vocabulary]:
    """The cases of the config's sources and folds (split from the fold) and the vocabulary they use."""
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
            raise InputError(f"{store!r}: no {'/'.join(cfg.sources)} cases in folds {sorted(folds)} "
                             "(run `python cli.py ingest` first)")
        vocab = Vocabulary.from_store(s, {code for c in cases for code in c.codes}, cfg.exclude_codes)
    return cases, vocab

