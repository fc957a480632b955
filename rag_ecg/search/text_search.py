"""Text query -> cases: lexical search fused with the encoder's text tower by reciprocal-rank fusion.

Why fuse: words find the statements a query names (precision), the text tower ranks by what reports mean
(no shared word needed); RRF needs no score calibration between the two, only their rankings. With an
index the search is restricted to the index's library (its cases; the training folds for PTB-XL), so that
evaluation charts are never returned; without one, the lexical ranking of the whole store is the answer.

A neighbour's `score` is its cosine to the query under the text tower when an index is used (as for any
text search), else its lexical score relative to the best hit (1.0). Label votes are the plain share of the
returned cases carrying each label: the index's calibration was fitted on page similarities, not on text.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import select

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case, Store, scp_descriptions
from rag_ecg.errors import InputError
from rag_ecg.search.evidence import SCORE_DECIMALS, Evidence, Neighbour
from rag_ecg.search.lexical import LexicalSearch

RRF_K = 60  # the usual reciprocal-rank constant: damps the weight of the very first ranks
DEPTH = 200  # hits taken from each ranking before fusing
# lexical, tower. The tower (text->case R@1 0.08) orders the cases the words score alike and ranks those no word
# finds, but must not outvote the words: its first place (0.1/61) is worth the words' gap between ranks 8 and
# ~16. Measured (bench/search.py --text, 43 statements): mean precision@8 1.00 at 0, 0.99 at 0.1, 0.97 at 0.25,
# 0.87 at 0.5, 0.63 at 1 (plain RRF).
WEIGHTS = (1.0, 0.1)


def rrf(rankings: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None,
        k: int = RRF_K) -> list[tuple[int, float]]:
    """Weighted reciprocal-rank fusion of [(id, score)] rankings (best first): id -> Σ w / (k + rank).

    Equal scores share a rank (the best of their places), so where one ranking cannot tell cases apart
    (many reports with the same statements score the same) the other ranking orders them.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    fused: dict[int, float] = {}
    for ranking, w in zip(rankings, weights, strict=True):
        rank, last = 0, None
        for place, (cid, score) in enumerate(ranking, start=1):
            if score != last:
                rank, last = place, score
            fused[cid] = fused.get(cid, 0.0) + w / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


class TextSearch:
    """Text queries against a store, fused with a `Retriever`'s text tower when one is given."""

    def __init__(self, store: Store, retriever=None, library: Collection[int] | None = None):
        """`library`: the case ids searched (default: the retriever's index, else the whole store)."""
        self.store = store
        self.retriever = retriever
        self.lexical = LexicalSearch(store)
        if not self.lexical.available and retriever is None:
            raise InputError(f"{store.safe_url}: no full-text search on this database; give an index (--index) "
                             "to search by the text tower")
        self.library: set[int] | None = None if library is None else {int(i) for i in library}
        self._embedded: dict[str, np.ndarray] = {}  # the last query's text-tower embedding
        if retriever is not None:
            index = retriever.text_index or retriever.image_index
            ids = {int(i) for i in index.ids}
            self.library = ids if self.library is None else self.library & ids
        with store.session() as s:
            self.descriptions = scp_descriptions(s)

    def rankings(self, query: str, depth: int = DEPTH, source: str | None = None,
                 recognise: bool = True) -> dict[str, list]:
        """Each method's ranking as [(case id, score)], best first: `lexical`, and `tower` with an index."""
        allowed = self._allowed(source)
        out = {"lexical": self.lexical.search(query, depth, allowed, recognise)}
        if self.retriever is not None:
            index = self.retriever.text_index or self.retriever.image_index
            narrowed = allowed is not None and len(allowed) < index.ntotal
            scores, ids = index.search(self._embed(query)[None], index.ntotal if narrowed else min(index.ntotal, depth))
            out["tower"] = [(int(i), float(s)) for s, i in zip(scores[0], ids[0])
                            if i >= 0 and (allowed is None or int(i) in allowed)][:depth]
        return out

    def search(self, query: str, k: int = 8, source: str | None = None) -> Evidence:
        ranks = self.rankings(query, source=source)
        if "tower" in ranks:
            fused = [cid for cid, _ in rrf([ranks["lexical"], ranks["tower"]], WEIGHTS)][:k]
            index = self.retriever.text_index or self.retriever.image_index
            scores = (index.vectors(fused) @ self._embed(query)).tolist() if fused else []
        else:
            best = ranks["lexical"][0][1] if ranks["lexical"] else 1.0
            fused = [c for c, _ in ranks["lexical"][:k]]
            scores = [s / best for _, s in ranks["lexical"][:k]]
        cases = self._cases(fused)
        neighbours = [self._neighbour(cases[c], s) for c, s in zip(fused, scores) if c in cases]
        return self._evidence(neighbours, k)

    # ---- internals -----------------------------------------------------------------------------------
    def _embed(self, query: str) -> np.ndarray:
        if query not in self._embedded:
            self._embedded = {query: np.asarray(self.retriever.encoder.embed_texts([query]), np.float32)[0]}
        return self._embedded[query]

    def _allowed(self, source: str | None) -> set[int] | None:
        if source is None:
            return self.library
        with self.store.session() as s:
            ids = {int(i) for i in s.scalars(select(Case.id).where(Case.source == source))}
        return ids if self.library is None else ids & self.library

    def _cases(self, ids: Sequence[int]) -> dict[int, Case]:
        if not ids:
            return {}
        with self.store.session() as s:
            return {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(list(ids))))}

    def _neighbour(self, c: Case, score: float) -> Neighbour:
        page = Path(self.retriever.index_dir) / "pages" / f"{c.id}.jpg" if self.retriever is not None else None
        return Neighbour(
            case_id=c.id, score=round(float(score), SCORE_DECIMALS), source=c.source, external_id=c.external_id,
            report=c.report, codes=dict(c.codes or {}), labels=list(c.labels or []), age=c.age, sex=c.sex,
            patient_id=c.patient_id, image_path=str(page) if page is not None and page.exists() else None,
            code_descriptions={code: self.descriptions[code] for code in (c.codes or {})
                               if code in self.descriptions})

    def _evidence(self, neighbours: list[Neighbour], k: int) -> Evidence:
        n = max(len(neighbours), 1)
        codes = sorted({code for nb in neighbours for code in nb.codes})
        r = self.retriever
        return Evidence(
            neighbours=neighbours,
            superclass_scores={lab: float(np.sum([lab in nb.labels for nb in neighbours]) / n)
                               for lab in SUPERCLASSES},
            code_scores={code: float(np.sum([code in nb.codes for nb in neighbours]) / n) for code in codes},
            k=k, index_name=r.name if r is not None else "lexical",
            encoder_hash=r.encoder.checkpoint_hash if r is not None else "")
