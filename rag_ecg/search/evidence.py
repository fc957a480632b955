"""What retrieval hands to a reader: the neighbour cases and the label evidence voted from them.

Kept apart from `retrieve` (which needs an encoder and an index) so that prompts, reports and LLM
backends can be built and tested from evidence alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

# Similarities are ranked and reported at 1e-5: ~100x the float noise (~1e-7) that other torch thread settings
# leave in embeddings, so near-ties rank by case id whatever machine computed them.
SCORE_DECIMALS = 5


@dataclass
class Neighbour:
    """One retrieved reference case, with what a reader needs to cite and weigh it."""

    case_id: int  # primary key in the case store: the id a report cites
    score: float  # cosine similarity to the query, in [-1, 1]
    source: str
    external_id: str
    report: str = ""
    codes: dict[str, float] = field(default_factory=dict)  # SCP-ECG code -> likelihood
    code_descriptions: dict[str, str] = field(default_factory=dict)  # SCP-ECG code -> English text
    labels: list[str] = field(default_factory=list)  # superclasses
    age: float | None = None
    sex: str | None = None
    patient_id: str | None = None
    image_path: str | None = None  # a rendered page of the case, when the index kept one
    similarity_pct: float | None = None  # % of the library's own case pairs less similar than this (0-100)


def similarity_text(score: float, pct: float | None) -> str:
    """"0.931 · closer than 97 % of best matches": the cosine, and where it stands among the best matches held-out
    pictures found (`Calibration.percentile`; only when the index knows it) — the cosine alone crowds near 1."""
    return f"{score:.3f}" if pct is None else f"{score:.3f} · closer than {pct:.0f} % of best matches"


def ranked(neighbours: Iterable[Neighbour]) -> list[Neighbour]:
    """Best first by (similarity rounded to SCORE_DECIMALS, case id): the one order neighbours are cited in."""
    return sorted(neighbours, key=lambda n: (-round(float(n.score), SCORE_DECIMALS), n.case_id))


def rank_hits(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, m) search hits -> each row's best k by (score rounded to SCORE_DECIMALS, descending; case id),
    padding (-1, -inf) last; the rounded scores are reported, so what is shown is what was ranked."""
    rounded = np.round(np.asarray(scores, dtype=np.float64), SCORE_DECIMALS)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -rounded), axis=-1)[:, :k]
    return np.take_along_axis(rounded, order, -1).astype(np.float32), np.take_along_axis(ids, order, -1)


@dataclass
class Evidence:
    """Neighbours plus similarity-weighted votes: label -> score in [0, 1].

    `superclass_scores` are calibrated probabilities (Platt scaling fitted on the reference library);
    `thresholds` are the per-label decision points chosen on that library (F1-best), when known.
    """

    neighbours: list[Neighbour]
    superclass_scores: dict[str, float] = field(default_factory=dict)
    code_scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # label -> decision threshold (calibrated)
    k: int = 0
    index_name: str = ""
    encoder_hash: str = ""

    @property
    def case_ids(self) -> list[int]:
        return [n.case_id for n in self.neighbours]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Evidence":
        return cls(neighbours=[Neighbour(**n) for n in d.get("neighbours", [])],
                   **{k: v for k, v in d.items() if k != "neighbours"})
