"""How a vector index is built and searched (`IndexConfig`, saved in every index manifest), and its error type.

The kinds and the trade-offs behind each default are described in `rag_ecg.search.vector_index`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rag_ecg.config import coerce_fields
from rag_ecg.errors import ConfigError, RagEcgError

KINDS = ("flat", "ivfpq", "hnsw", "auto")


class VectorIndexError(RagEcgError, ValueError):
    """Bad input to the index or an index that cannot be used; the message names the input."""


@dataclass
class IndexConfig:
    """How to build and search the index; saved in the manifest, loadable from a dict."""

    kind: str = "auto"  # flat | ivfpq | hnsw | auto (exact below auto_threshold, auto_large_kind above)
    auto_threshold: int = 50_000  # auto: vectors at which exact search hands over to an ANN kind
    auto_large_kind: str = "ivfpq"  # auto: the ANN kind used at or above auto_threshold (ivfpq | hnsw)
    nlist: int | None = None  # ivfpq: coarse lists; None = power of two near sqrt(n) (1,024 at 1M)
    nprobe: int = 8  # ivfpq: lists scanned per query (recall vs speed)
    pq_m: int | None = None  # ivfpq: PQ sub-quantizers (bytes per code); None = dim // 8; must divide dim
    pq_nbits: int | None = None  # ivfpq: bits a code: 4 = SIMD fast-scan (CPU only), 8 = GPU-capable;
    #                              None = 8 when a GPU will search, else 4
    k_factor: int = 16  # ivfpq: candidates re-ranked exactly per result (k * k_factor)
    train_min: int = 10_000  # ivfpq: stay exact until this many vectors (exact is fast below; PQ needs data)
    train_size: int = 100_000  # ivfpq: training sample size (k-means cost grows with it)
    retrain_growth: float = 8.0  # ivfpq: retrain once rows grow this factor past training (if nlist grows); 0 = never
    hnsw_m: int = 32  # hnsw: graph links per node
    ef_construction: int = 40  # hnsw: candidate list while building (build time vs graph quality)
    ef_search: int = 64  # hnsw: candidate list while searching (>= k is enforced)
    auto_compact_fraction: float = 0.25  # ivfpq/hnsw: compact when tombstoned rows pass this share; 0 = never
    norm_tolerance: float = 1e-3  # refuse vectors whose L2 norm differs from 1 by more than this
    device: str = "auto"  # auto (GPU when faiss sees one) | cpu | gpu (fail without one)
    seed: int = 0  # training-sample and k-means seed, for reproducible builds

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VectorIndexError(f"index config kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.auto_large_kind not in ("ivfpq", "hnsw"):
            raise VectorIndexError(f"index config auto_large_kind={self.auto_large_kind!r}: expected ivfpq or hnsw")
        if self.device not in ("auto", "cpu", "gpu"):
            raise VectorIndexError(f"index config device={self.device!r}: expected auto, cpu or gpu")
        for name in ("nprobe", "k_factor", "train_min", "train_size", "hnsw_m",
                     "ef_construction", "ef_search", "auto_threshold"):
            if int(getattr(self, name)) < 1:
                raise VectorIndexError(f"index config {name}={getattr(self, name)!r}: must be >= 1")
        for name in ("nlist", "pq_m", "pq_nbits"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise VectorIndexError(f"index config {name}={getattr(self, name)!r}: must be >= 1 or null")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IndexConfig":
        """An IndexConfig from a mapping of its fields (a manifest's `config`, `BuildConfig.index`); unknown
        fields are an error, and strings such as YAML's `1e-3` become the number a field declares."""
        try:
            fields = coerce_fields(cls, dict(d or {}), "index config")
        except ConfigError as e:
            raise VectorIndexError(str(e)) from None
        return cls(**fields)
