"""Retrieved-case evidence for instruction prompts: neighbours from a built index or a trained encoder, never
the case itself, its patient or a validation case, with the same votes the retriever computes at inference."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rag_ecg.data.images import load_image
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import InputError
from rag_ecg.eval.metrics import vote_scores
from rag_ecg.search.evidence import Evidence, Neighbour
from rag_ecg.search.retrieve import Retriever
from training.instruction_cases import CaseInfo
from training.instruction_config import InstructionConfig

log = logging.getLogger(__name__)

Retrieve = Callable[[object], Evidence]  # case -> Evidence


def evidence_from_hits(hits: list[tuple[float, CaseInfo]], k: int, descriptions: dict[str, str],
                       temperature: float, probability=None, index_name: str = "",
                       encoder_hash: str = "", image_paths: dict[int, str] | None = None) -> Evidence:
    """Top-k neighbours + similarity-weighted votes over them (the same vote the retriever computes)."""
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


def admissible(case: CaseInfo, other: CaseInfo | None) -> bool:
    """A neighbour may be shown: a train case, not this case, not this patient."""
    return (other is not None and other.id != case.id and other.split == "train"
            and not (case.patient_id is not None and other.patient_id == case.patient_id))


def encoder_retriever(encoder_dir: str | Path, cases: dict[int, CaseInfo], out_dir: Path,
                      cfg: InstructionConfig, descriptions: dict[str, str]) -> Retrieve:
    """Nearest train pages by the trained encoder's cosine similarity (exact search over the train split)."""
    enc = ECGEncoder.load(encoder_dir)
    lib = [c for c in cases.values() if c.split == "train"]
    if not lib:
        raise InputError("encoder retrieval: no train cases to retrieve from")

    def pages(cs):
        for c in cs:
            yield load_image(out_dir / c.image)

    log.info(f"embedding {len(lib)} train pages with {encoder_dir} for evidence retrieval")
    lib_emb = enc.embed_images(pages(lib), strict=False)  # (n_train, d), L2-normalised
    row = {c.id: i for i, c in enumerate(lib)}
    q_cache: dict[int, np.ndarray] = {}

    def retrieve(case) -> Evidence:
        c = cases[case.id]
        q = lib_emb[row[c.id]] if c.id in row else q_cache.setdefault(c.id, enc.embed_images(pages([c]), strict=False)[0])
        sims = lib_emb @ q
        order = np.argsort(-sims, kind="stable")
        hits = []
        for i in order:
            if admissible(c, lib[i]):
                hits.append((float(sims[i]), lib[i]))
                if len(hits) >= cfg.evidence_k:
                    break
        return evidence_from_hits(hits, cfg.evidence_k, descriptions, cfg.vote_temperature,
                                  index_name=f"encoder:{Path(encoder_dir).name}", encoder_hash=enc.checkpoint_hash)

    return retrieve


def index_retriever(index_dir: str | Path, store, cases: dict[int, CaseInfo], out_dir: Path,
                    cfg: InstructionConfig, descriptions: dict[str, str]) -> Retrieve:
    """A built index (rag_ecg.search.retrieve.Retriever): the case's page as the query, then our admissibility."""
    r = Retriever.open(index_dir, store)
    cal = r.calibration

    def retrieve(case) -> Evidence:
        c = cases[case.id]
        page = load_image(out_dir / c.image)
        want = cfg.evidence_k * 4 + 16
        while True:
            ev = r.search_images([page], k=want, exclude_patients=[c.patient_id])[0]
            hits = [(n.score, cases.get(n.case_id)) for n in ev.neighbours]
            hits = [(s, h) for s, h in hits if admissible(c, h)]
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
            raise InputError(f"retrieve(case {case.id}) returned case {n.case_id}, which is not a usable case")
        if other.id == case.id or (case.patient_id is not None and other.patient_id == case.patient_id):
            raise InputError(f"retrieve(case {case.id}) returned case {other.id} of the same patient "
                             f"{case.patient_id}: evidence would leak the answer")
        if other.split != "train":
            raise InputError(f"retrieve(case {case.id}) returned case {other.id} from the {other.split} "
                             "split: evidence must come from training cases only")


def citation_sentence(case: CaseInfo, evidence) -> str:
    """Which retrieved cases share the case's own diagnostic classes (true by construction), cited by id."""
    agree = [n for n in evidence.neighbours if set(n.labels) & set(case.labels)]
    if not agree:
        return "None of the retrieved reference cases shares these diagnostic classes."
    cites = ", ".join(f"[case {n.case_id}] ({'/'.join(sorted(set(n.labels) & set(case.labels)))})"
                      for n in agree)
    return f"Retrieved reference cases with the same diagnostic class: {cites}."

