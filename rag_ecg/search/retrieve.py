"""Query (page image | report text | embedding) -> nearest reference cases + similarity-weighted label evidence.

A built index folder (see `index/build.py`) holds everything a query needs: the encoder checkpoint it was
built with, the image and text FAISS indexes, small rendered pages of each case, and the vote calibration
fitted on the reference library alone. Case metadata comes from the case store by id.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sqlalchemy import select

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case, Store, scp_descriptions
from rag_ecg.data.text_repair import repair_report
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import ArtifactError, InputError
from rag_ecg.eval.metrics import vote_scores
from rag_ecg.search.calibration import index_calibration
from rag_ecg.search.evidence import SCORE_DECIMALS, Evidence, Neighbour
from rag_ecg.search.index_folder import check_store
from rag_ecg.search.vector_index import VectorIndex

MANIFEST = "manifest.json"


class IndexNotReadyError(ArtifactError):
    """The index folder is missing or its build did not finish."""


class NotAnECGError(InputError):
    """The query is far from every reference page: most likely not an ECG (or an unreadable one)."""


class Retriever:
    """Nearest reference cases for queries, with the evidence a reader needs to cite them."""

    def __init__(self, index_dir: Path, store: Store, encoder, image_index: VectorIndex,
                 text_index: VectorIndex | None, manifest: dict, library_calibration: bool = False):
        self.index_dir = Path(index_dir)
        self.store = store
        self.encoder = encoder
        self.image_index = image_index
        self.text_index = text_index
        self.manifest = manifest
        self.calibration, self.site_calibration = index_calibration(
            self.index_dir, manifest, getattr(encoder, "checkpoint_hash", None), library_calibration)
        self.name = manifest.get("name", self.index_dir.name)
        with store.session() as s:
            self._descriptions = scp_descriptions(s)

    @classmethod
    def open(cls, index_dir: str | Path, store: Store, device: str = "cpu",
             library_calibration: bool = False) -> "Retriever":
        """`library_calibration`: ignore the folder's site calibration (what `calibrate` refits from)."""
        index_dir = Path(index_dir)
        mpath = index_dir / MANIFEST
        if not mpath.exists():
            raise IndexNotReadyError(f"{index_dir}: no finished index here (build it with "
                                     f"`python cli.py build-index`)")
        manifest = json.loads(mpath.read_text())
        encoder = ECGEncoder.load(index_dir / "encoder", device=device)
        images = VectorIndex.load(index_dir / "images.faiss", expected_encoder_hash=encoder.checkpoint_hash)
        texts = None
        if (index_dir / "texts.faiss").exists():
            texts = VectorIndex.load(index_dir / "texts.faiss", expected_encoder_hash=encoder.checkpoint_hash)
        ids = images.ids if texts is None else np.union1d(images.ids, texts.ids)
        check_store(index_dir, store, manifest, ids)  # ids name the same ECGs in this store as when built
        return cls(index_dir, store, encoder, images, texts, manifest, library_calibration)

    # ---- queries -------------------------------------------------------------------------------------
    def search_images(self, images: Sequence, k: int = 8, **filters) -> list[Evidence]:
        return self.search_embeddings(self.encoder.embed_images(list(images)), k, **filters)

    def search_texts(self, texts: Sequence[str], k: int = 8, **filters) -> list[Evidence]:
        """Report text -> cases whose reports (text index) or pages (image index) match it."""
        index = self.text_index or self.image_index
        return self.search_embeddings(self.encoder.embed_texts(list(texts)), k, index=index, images=False,
                                      **filters)

    def search_embeddings(self, emb: np.ndarray, k: int = 8,
                          exclude_patients: Sequence[str | None] | None = None,
                          source: str | None = None, index: VectorIndex | None = None,
                          images: bool = True) -> list[Evidence]:
        """(n, d) normalised query embeddings -> one Evidence per query (neighbours best first).

        `images`: the queries are picture embeddings, so the encoder's superclass head may join the vote."""
        index = index or self.image_index
        emb = np.asarray(emb, dtype=np.float32)
        n = len(emb)
        heads = self._head_logits(emb) if images else [None] * n
        exclude = list(exclude_patients) if exclude_patients is not None else [None] * n
        vote_k = max(k, self.calibration.k)
        want = vote_k
        while True:
            fetch = min(index.ntotal, want * 4 + 16)
            scores, ids = index.search(emb, fetch)
            cases = self._cases({int(i) for i in ids.ravel() if i >= 0})
            kept = [self._filter(scores[q], ids[q], cases, exclude[q], source, vote_k) for q in range(n)]
            if all(len(x) >= vote_k for x in kept) or fetch >= index.ntotal:
                break
            want *= 4
        return [self._evidence(hits, cases, k, head) for hits, head in zip(kept, heads)]

    def check(self, evidence: Evidence) -> None:
        """Raise NotAnECGError when the best match is further than any real ECG page was from the library."""
        floor = self.calibration.min_top_score
        if floor is not None and evidence.neighbours and evidence.neighbours[0].score < floor:
            raise NotAnECGError(f"best similarity {evidence.neighbours[0].score:.3f} is below "
                                f"{floor:.3f}, the lowest seen for real ECG pages: not an ECG?")

    # ---- internals -----------------------------------------------------------------------------------
    def _head_logits(self, emb: np.ndarray) -> list:
        """Per query, the encoder head's superclass logits when the calibration fuses them (else None)."""
        enc = self.encoder
        if not self.calibration.fusion or getattr(enc, "aux_head", None) is None \
                or tuple(enc.aux_classes) != tuple(SUPERCLASSES):
            return [None] * len(emb)
        with torch.inference_mode():
            out = enc.aux_logits(torch.from_numpy(emb).to(enc.device)).float().cpu().numpy()
        return list(out)

    def _cases(self, ids: set[int]) -> dict[int, Case]:
        if not ids:
            return {}
        with self.store.session() as s:
            return {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(sorted(ids))))}

    @staticmethod
    def _filter(scores, ids, cases, patient, source, want) -> list[tuple[float, Case]]:
        out = []
        for sc, cid in zip(scores, ids):
            case = cases.get(int(cid))
            if case is None:  # -1 padding, or a case deleted from the store after indexing
                continue
            if patient is not None and case.patient_id == patient:
                continue
            if source is not None and case.source != source:
                continue
            out.append((round(float(sc), SCORE_DECIMALS), case))  # ranked at this precision (vector_index)
            if len(out) >= want:
                break
        return out

    def _evidence(self, hits: list[tuple[float, Case]], cases, k: int, head=None) -> Evidence:
        cal = self.calibration
        voters = hits[:cal.k]
        scores = np.array([[s for s, _ in voters]]) if voters else np.zeros((1, 0))
        labels = list(SUPERCLASSES)
        y = np.array([[[lab in (c.labels or []) for lab in labels] for _, c in voters]], float)
        codes = sorted({code for _, c in voters for code in (c.codes or {})})
        yc = np.array([[[code in (c.codes or {}) for code in codes] for _, c in voters]], float)
        sup = vote_scores(scores, y.reshape(1, len(voters), len(labels)), cal.temperature)[0] if voters else []
        cod = vote_scores(scores, yc.reshape(1, len(voters), len(codes)), cal.temperature)[0] if voters else []
        return Evidence(
            neighbours=[self._neighbour(s, c) for s, c in hits[:k]],
            superclass_scores={lab: cal.probability(lab, float(v), None if head is None else float(head[j]))
                               for j, (lab, v) in enumerate(zip(labels, sup))},
            code_scores={code: float(v) for code, v in zip(codes, cod)},
            thresholds=dict(cal.thresholds or {}), k=k, index_name=self.name,
            encoder_hash=self.encoder.checkpoint_hash,
        )

    def _neighbour(self, score: float, c: Case) -> Neighbour:
        page = self.index_dir / "pages" / f"{c.id}.jpg"
        return Neighbour(
            case_id=c.id, score=score, source=c.source, external_id=c.external_id, report=repair_report(c.report),
            codes=dict(c.codes or {}), labels=list(c.labels or []), age=c.age, sex=c.sex,
            patient_id=c.patient_id, image_path=str(page) if page.exists() else None,
            similarity_pct=self.calibration.percentile(score),
            code_descriptions={code: self._descriptions[code] for code in (c.codes or {})
                               if code in self._descriptions},
        )
