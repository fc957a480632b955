"""FAISS nearest-neighbour index over case embeddings: cosine search keyed by case id, add, remove, compact.

Vectors are L2-normalised float32 rows of shape (n, dim) (the encoder's output), searched by inner product,
so scores are cosine similarities in [-1, 1]. Every FAISS row carries the store's int64 case id through an
`IndexIDMap2`; results come back as case ids, never as row numbers.

Kinds (``IndexConfig.kind``, `index_config`):
- ``flat``: exact `IndexFlatIP`. Ground truth, and the only kind whose results are exact by construction;
  fine up to ~50k vectors (a 1,000-query batch over 50k x 512 takes well under a second on 2 cores).
- ``ivfpq``: IVF (coarse k-means into `nlist` lists) with product-quantised codes, whose top `k * k_factor`
  candidates are re-ranked exactly by `IndexRefineFlat`. PQ codes alone are too lossy (recall@10 0.34
  measured); the exact re-rank brings recall@10 to ~0.99. On CPU the codes are 4-bit "fast-scan" codes scanned
  with SIMD (`IndexIVFPQFastScan`, several times faster than 8-bit PQ here); when a GPU will search, 8-bit
  `IndexIVFPQ` codes, which faiss-gpu can clone (sharded over several GPUs). Needs training: until `train_min`
  vectors are stored the index stays exact (`flat`) and trains itself on a sample (`train_size`) once it has
  enough; if the sample cannot support the requested `nlist` (39 vectors a list) nlist is reduced, logged and
  recorded in `notes`, and the index retrains once the data has grown `retrain_growth` times.
- ``hnsw``: `IndexHNSWFlat` (M links a node, `ef_search` candidates a query). No training and good recall, but
  a slow build and CPU only (FAISS has no GPU HNSW); removal by tombstones.
- ``auto``: exact below `auto_threshold` (50k) vectors, where exact search is fast enough and ANN would only
  cost recall; at the threshold it converts to `auto_large_kind`, ``ivfpq`` by default: on 1M x 512
  clustered embeddings (bench/search.py, 2 shared cores) it built ~4x faster than HNSW (107 s vs 416 s),
  reached higher recall@10 (0.994 at nprobe 8 vs 0.988 at efSearch 64) at ~5x the q/s (6.8k vs 1.3k; exact
  search: 16), and it runs on GPUs.

Ranking (`evidence.rank_hits`): by score rounded to 1e-5, then case id, so thread-count float noise cannot swap
near-ties; a few extra candidates are fetched so that a tie at the k-th place is cut by case id too.

Removal: `flat` deletes rows; `ivfpq`/`hnsw` cannot shift rows, so removed rows are tombstoned, excluded
inside the search (FAISS ID selectors), and physically dropped by `compact()` (automatically once tombstones
pass `auto_compact_fraction`). Input vectors that are not unit-norm are refused, not silently normalised: an
unnormalised vector means the wrong tensor was passed (use `l2_normalise` explicitly when that is intended).

Saving writes the FAISS file and its JSON manifest as a checked pair (`index_files`); a GPU search replica
is cloned from the CPU master copy when faiss-gpu sees a GPU (`faiss_gpu`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag_ecg.search.evidence import rank_hits
from rag_ecg.search.faiss_gpu import gpu_replica, num_gpus, search_replica
from rag_ecg.search.index_config import IndexConfig, VectorIndexError
from rag_ecg.search.index_files import (FORMAT, IndexLoadError, read_index_pair, serialized_size,
                                        write_index_pair)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity
_MIN_PER_LIST = 39  # FAISS k-means wants >= 39 training points per centroid
_TIE_MARGIN = 16  # candidates fetched beyond k so that ties at the k-th place are cut by case id


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (n, d); zero rows are an error (they have no direction)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise VectorIndexError("l2_normalise: zero vector(s) have no direction")
    return (x / norms).astype(np.float32)


class VectorIndex:
    """Cosine k-NN over case embeddings keyed by case id; CPU master copy, optional GPU search replica."""

    def __init__(self, dim: int, config: IndexConfig | None = None, *, encoder_hash: str = "") -> None:
        if int(dim) < 1:
            raise VectorIndexError(f"index dim={dim!r}: must be >= 1")
        self.dim = int(dim)
        self.config = config or IndexConfig()
        m = self.config.pq_m or max(1, self.dim // 8)
        if self.config.kind in ("ivfpq", "auto") and self.dim % m:
            raise VectorIndexError(f"index config pq_m={m}: must divide the embedding dim {self.dim}")
        self.encoder_hash = encoder_hash
        self.created = _now()
        self.notes: list[str] = []  # fallbacks taken (nlist reduced, GPU unavailable for hnsw, ...)
        self._kind = "flat" if self.config.kind in ("auto", "ivfpq") else self.config.kind
        self._params: dict[str, Any] = {}
        self._index = faiss.IndexIDMap2(self._new_inner(self._kind, None))
        self._labels = np.empty(0, dtype=np.int64)  # row -> case id (mirror of IndexIDMap2.id_map)
        self._dead = np.empty(0, dtype=np.int64)  # tombstoned rows, sorted (ivfpq/hnsw)
        self._gpu: Any = None  # (search index, keepalive) replica; None = not built / CPU
        self._gpu_dirty = True
        self._selector: Any = None
        self._live: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # cache, see _live_rows_ids
        self._check_device()

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The structure built now (flat | ivfpq | hnsw); `config.kind` is what was asked for."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """Live vectors (stored rows minus tombstones)."""
        return int(self._index.ntotal) - len(self._dead)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def params(self) -> dict[str, Any]:
        """Effective build/search parameters of the current structure (nlist after any fallback, ...)."""
        return dict(self._params)

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on GPU: flat and 8-bit IVF-PQ can; HNSW and 4-bit fast-scan stay on CPU."""
        gpu_capable = self._kind == "flat" or (self._kind == "ivfpq" and not self._params.get("fast_scan"))
        return gpu_capable and self._use_gpu()

    @property
    def ids(self) -> np.ndarray:
        """Live case ids, int64 (n,), in row order."""
        return self._live_rows_ids()[1].copy()

    def __contains__(self, case_id) -> bool:
        return bool(len(self._rows_of(np.array([case_id], dtype=np.int64), strict=False)))

    def vectors(self, ids) -> np.ndarray:
        """The stored (exact) vectors of case ids, float32 (n, dim) in the order given; unknown ids are an error."""
        rows = self._rows_of(np.asarray(ids, dtype=np.int64).reshape(-1), strict=True)
        if len(rows) == 0:
            return np.empty((0, self.dim), np.float32)
        return self._storage().reconstruct_batch(rows).astype(np.float32, copy=False)

    # ---- mutation ---------------------------------------------------------------------------------------
    def add(self, ids, vectors) -> None:
        """Add unit-norm vectors (n, dim) float32 under case ids (n,) int64 >= 0, unique and not present."""
        x = self._check_vectors(vectors, "add: vectors", allow_1d=False)
        ids = self._check_ids(ids, len(x))
        if len(x) == 0:
            return
        present = ids[np.isin(ids, self._live_rows_ids()[1])]
        if len(present):
            raise VectorIndexError(f"add: case id(s) already in the index: {_few(present)} "
                                   f"(remove them first to replace)")
        target = self._upgrade_target(int(self._index.ntotal) + len(x))
        if target is not None:  # leave exact search: build the ANN structure straight from all the data
            log.info("%s: built at %d vectors (exact search below that)", target, int(self._index.ntotal) + len(x))
            x_all = np.concatenate([self._live_vectors(), x]) if self._index.ntotal else x
            ids_all = np.concatenate([self.ids, ids]) if self._index.ntotal else ids
            inner = self._new_inner(target, x_all)
            self._kind = target
            self._replace(inner, ids_all, x_all)
            return
        self._index.add_with_ids(x, ids)
        self._labels = np.concatenate([self._labels, ids])
        self._gpu_dirty, self._live = True, None
        self._maybe_retrain()

    def remove(self, ids) -> int:
        """Remove case ids (unknown ids are ignored); returns how many vectors were removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        rows = np.flatnonzero(np.isin(self._labels, ids))
        if len(self._dead):
            rows = np.setdiff1d(rows, self._dead)
        if len(rows) == 0:
            return 0
        if self._kind == "flat":
            self._index.remove_ids(faiss.IDSelectorBatch(self._labels[rows]))
            self._labels = np.delete(self._labels, rows)
        else:
            self._dead = np.union1d(self._dead, rows).astype(np.int64)
            self._selector = None
            frac = self.config.auto_compact_fraction
            if frac > 0 and len(self._dead) >= frac * self._index.ntotal:
                self.compact()
        self._gpu_dirty, self._live = True, None
        return int(len(rows))

    def compact(self, retrain: bool = False) -> None:
        """Rebuild without tombstoned rows; `retrain` re-trains IVF-PQ on the live data (after large growth)."""
        if self._kind == "flat" or (not len(self._dead) and not retrain):
            return
        ids = self.ids
        x = self._live_vectors()
        if self._kind == "ivfpq" and not retrain:
            refine = faiss.downcast_index(self._index.index)
            ivf = faiss.clone_index(faiss.downcast_index(refine.base_index))
            ivf.reset()  # keeps the trained quantizer and PQ codebooks
            inner = faiss.IndexRefineFlat(ivf)
            inner.own_fields = True
            ivf.this.disown()
        else:
            inner = self._new_inner(self._kind, x)
        self._replace(inner, ids, x)

    # ---- search -----------------------------------------------------------------------------------------
    def search(self, queries, k: int, *, nprobe: int | None = None, ef_search: int | None = None,
               k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: scores (n, k) float32 and case ids (n, k) int64, best first; -1 / -inf pad."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorIndexError(f"search: k={k!r} must be a positive integer")
        k = int(k)
        q = self._check_vectors(queries, "search: queries", allow_1d=True)
        n = len(q)
        if n == 0 or self.ntotal == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        kk = min(k + _TIE_MARGIN, int(self._index.ntotal))
        nprobe = int(nprobe or self.config.nprobe)
        ef = max(int(ef_search or self.config.ef_search), kk)
        kf = int(k_factor or self.config.k_factor)
        inner = faiss.downcast_index(self._index.index)
        if self.on_gpu:
            D, I = self._search_gpu(q, kk, nprobe, kf)
        elif self._kind == "flat":
            D, I = inner.search(q, kk)
        elif self._kind == "hnsw":
            p = faiss.SearchParametersHNSW(efSearch=ef)
            if len(self._dead):
                p.sel = self._alive_selector()
            D, I = inner.search(q, kk, params=p)
        else:
            bp = faiss.SearchParametersIVF(nprobe=nprobe)
            if len(self._dead):
                bp.sel = self._alive_selector()
            D, I = inner.search(q, kk, params=faiss.IndexRefineSearchParameters(k_factor=kf, base_index_params=bp))
        ids = np.where(I >= 0, self._labels[np.clip(I, 0, None)], -1).astype(np.int64)
        scores, ids = rank_hits(np.where(I >= 0, D, -np.inf), ids, k)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            scores = np.hstack([scores, np.full((n, pad), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((n, pad), -1, np.int64)])
        return scores, ids

    # ---- persistence ------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """What the saved file is and what made it (written beside it as JSON)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "kind": self._kind, "requested_kind": self.config.kind,
            "dim": self.dim, "metric": METRIC, "normalised": True,
            "count": self.ntotal, "rows": int(self._index.ntotal),
            "encoder_hash": self.encoder_hash,
            "faiss_version": faiss.__version__,
            "created": self.created, "saved": _now(),
            "params": self._params, "config": self.config.to_dict(), "notes": self.notes,
            "tombstoned_rows": self._dead.tolist(),
        }

    def nbytes(self) -> int:
        """Bytes of the serialised CPU index (what `save` writes), counted without a copy."""
        return serialized_size(self._index)

    def save(self, path: str | Path) -> Path:
        """Write `path` and its manifest, each atomically, index first (`index_files.write_index_pair`)."""
        return write_index_pair(path, self._index, self.manifest())

    @classmethod
    def load(cls, path: str | Path, expected_encoder_hash: str | None = None, *, device: str | None = None,
             verify: bool = True) -> "VectorIndex":
        """Read an index saved by `save`; refuse one made by another encoder (IndexMismatchError)."""
        path = Path(path)
        index, m = read_index_pair(path, expected_encoder_hash, verify)
        try:
            config = IndexConfig.from_dict(m.get("config"))
        except (TypeError, VectorIndexError) as e:
            raise IndexLoadError(f"{path}: manifest config unusable ({e})") from e
        if device is not None:
            config = dataclasses.replace(config, device=device)
        self = cls.__new__(cls)
        self.dim = int(m["dim"])
        self.config = config
        self.encoder_hash = m.get("encoder_hash", "")
        self.created = m.get("created", "")
        self.notes = list(m.get("notes", []))
        self._kind = m["kind"]
        self._params = dict(m.get("params", {}))
        self._index = index
        self._labels = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._dead = np.asarray(m.get("tombstoned_rows", []), dtype=np.int64)
        self._gpu, self._gpu_dirty, self._selector, self._live = None, True, None, None
        if int(index.ntotal) != m.get("rows", index.ntotal) or self.ntotal != m.get("count", self.ntotal):
            raise IndexLoadError(f"{path}: holds {index.ntotal} rows but its manifest says {m.get('rows')}")
        self._check_device()
        return self

    # ---- internals --------------------------------------------------------------------------------------
    def _new_inner(self, kind: str, x: np.ndarray | None) -> Any:
        """An empty (trained, for ivfpq) FAISS structure of `kind`; `x` (n, dim) is the training data."""
        c, d = self.config, self.dim
        if kind == "flat":
            self._params = {}
            return faiss.IndexFlatIP(d)
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = c.ef_construction
            inner.hnsw.efSearch = c.ef_search
            self._params = {"M": c.hnsw_m, "efConstruction": c.ef_construction, "efSearch": c.ef_search}
            return inner
        assert kind == "ivfpq" and x is not None
        m = c.pq_m or max(1, d // 8)
        if d % m:
            raise VectorIndexError(f"index config pq_m={m}: must divide the embedding dim {d}")
        wanted = c.nlist or _auto_nlist(len(x))
        n_train = max(c.train_size, _MIN_PER_LIST * wanted)  # an explicit large nlist pays for its own sample
        rng = np.random.default_rng(c.seed)
        sample = x if len(x) <= n_train else x[np.sort(rng.choice(len(x), n_train, replace=False))]
        nlist = min(wanted, _pow2_floor(max(1, len(sample) // _MIN_PER_LIST)))
        if nlist < wanted:
            self._note(f"ivfpq: nlist {wanted} -> {nlist}: {len(sample)} training vectors support "
                       f"{_MIN_PER_LIST} per list; retrains when the data grows {c.retrain_growth:g}x "
                       f"(or call compact(retrain=True))")
        nbits = c.pq_nbits or (8 if self._use_gpu() else 4)
        quantizer = faiss.IndexFlatIP(d)
        if nbits == 4:  # 4-bit codes scanned with SIMD registers: several times faster on CPU, GPU cannot
            ivf = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
            ivf.pq.cp.max_points_per_centroid = 64  # PQ k-means on <= 16k points a sub-quantizer: ~10x faster
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.cp.seed = ivf.pq.cp.seed = c.seed
        ivf.cp.niter = ivf.pq.cp.niter = 10  # re-ranking absorbs the last bit of k-means quality
        if self._use_gpu() and nbits == 4:
            self._note("ivfpq: pq_nbits=4 (fast-scan) searches on CPU; use pq_nbits=8 to search on GPU")
        ivf.train(sample)
        inner = faiss.IndexRefineFlat(ivf)
        inner.own_fields = True
        ivf.this.disown()
        self._params = {"nlist": nlist, "nlist_wanted": wanted, "pq_m": m, "pq_nbits": nbits, "fast_scan": nbits == 4,
                        "nprobe": c.nprobe, "k_factor": c.k_factor, "trained_on": int(len(sample)),
                        "trained_at_rows": int(len(x))}
        return inner

    def _upgrade_target(self, rows: int) -> str | None:
        """The ANN kind an exact index turns into once it holds `rows` rows, or None to stay exact."""
        c = self.config
        if self._kind == "flat" and c.kind == "ivfpq" and rows >= c.train_min:
            return "ivfpq"
        if self._kind == "flat" and c.kind == "auto" and rows >= c.auto_threshold:
            return c.auto_large_kind
        return None

    def _maybe_retrain(self) -> None:
        """Retrain IVF-PQ once the data outgrew the nlist it was trained with (`retrain_growth`)."""
        c, rows = self.config, int(self._index.ntotal)
        if self._kind != "ivfpq" or c.retrain_growth <= 0:
            return
        grown = rows >= c.retrain_growth * self._params.get("trained_at_rows", rows)
        if grown and (c.nlist or _auto_nlist(rows)) > self._params.get("nlist", 0):
            log.info("ivfpq: retraining at %d vectors (grew %gx since training)", rows, c.retrain_growth)
            self.compact(retrain=True)

    def _replace(self, inner: Any, ids: np.ndarray, x: np.ndarray) -> None:
        index = faiss.IndexIDMap2(inner)
        index.own_fields = True
        inner.this.disown()
        for start in range(0, len(x), 100_000):
            index.add_with_ids(x[start:start + 100_000], ids[start:start + 100_000])
        self._index, self._labels = index, ids.astype(np.int64)
        self._dead = np.empty(0, dtype=np.int64)
        self._selector, self._gpu_dirty, self._live = None, True, None

    def _live_rows_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(live rows, their case ids), cached with the ids sorted for O(log n) membership tests."""
        if self._live is None:
            rows = np.arange(len(self._labels), dtype=np.int64)
            if len(self._dead):
                rows = np.delete(rows, self._dead)
            order = np.argsort(self._labels[rows], kind="stable")
            self._live = (rows, self._labels[rows], order)
        return self._live[0], self._live[1]

    def _rows_of(self, ids: np.ndarray, strict: bool) -> np.ndarray:
        """Rows holding live case `ids` (in the given order); unknown ids raise when `strict`, else drop."""
        rows, live_ids = self._live_rows_ids()
        order = self._live[2]
        sorted_ids = live_ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        if strict and not found.all():
            raise VectorIndexError(f"vectors: case id(s) not in the index: {_few(ids[~found])}")
        return rows[order[pos[found]]]

    def _storage(self) -> Any:
        """The exact float32 storage (IndexFlat) behind the current structure."""
        inner = faiss.downcast_index(self._index.index)
        if self._kind == "ivfpq":
            return faiss.downcast_index(inner.refine_index)
        if self._kind == "hnsw":
            return faiss.downcast_index(inner.storage)
        return inner

    def _live_vectors(self) -> np.ndarray:
        """Stored vectors of live rows, float32 (ntotal, dim), exact (flat storage or refine storage)."""
        x = faiss.vector_to_array(self._storage().codes).view(np.float32).reshape(-1, self.dim)
        return np.delete(x, self._dead, axis=0) if len(self._dead) else x

    def _alive_selector(self) -> Any:
        if self._selector is None:
            batch = faiss.IDSelectorBatch(self._dead)
            sel = faiss.IDSelectorNot(batch)
            sel.referenced_objects = [batch]  # keep the inner selector alive as long as the outer
            self._selector = sel
        return self._selector

    def _check_vectors(self, v, what: str, allow_1d: bool) -> np.ndarray:
        try:
            x = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise VectorIndexError(f"{what}: not a numeric array ({e})") from e
        if x.ndim == 1 and allow_1d:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise VectorIndexError(f"{what}: shape {tuple(x.shape)}, expected (n, {self.dim})")
        x = np.ascontiguousarray(x)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise VectorIndexError(f"{what}: row(s) {_few(bad)} contain NaN or infinity")
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > self.config.norm_tolerance)
        if len(bad):
            raise VectorIndexError(f"{what}: row {bad[0]} has L2 norm {norms[bad[0]]:.4g} ({len(bad)} row(s) not "
                                   f"unit-norm); the index expects L2-normalised embeddings (see l2_normalise)")
        return x

    @staticmethod
    def _check_ids(ids, n: int) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or len(a) != n:
            raise VectorIndexError(f"add: ids shape {tuple(a.shape)}, expected ({n},) to match the vectors")
        if n and not np.issubdtype(a.dtype, np.integer):
            raise VectorIndexError(f"add: ids must be integers (case ids), got {a.dtype}")
        a = a.astype(np.int64)
        if n and a.min() < 0:
            raise VectorIndexError(f"add: negative case id(s) {_few(a[a < 0])}; ids are >= 0 (-1 marks padding)")
        uniq, counts = np.unique(a, return_counts=True)
        if np.any(counts > 1):
            raise VectorIndexError(f"add: duplicate case id(s) in the batch: {_few(uniq[counts > 1])}")
        return a

    def _note(self, msg: str) -> None:
        log.warning(msg)
        self.notes.append(msg)

    # ---- GPU (reached only when faiss-gpu sees a GPU) ---------------------------------------------------
    def _use_gpu(self) -> bool:
        return self.config.device != "cpu" and num_gpus() > 0

    def _check_device(self) -> None:
        if self.config.device == "gpu" and num_gpus() == 0:
            raise VectorIndexError("index config device=gpu: FAISS sees no GPU (install faiss-gpu, the [gpu] extra, "
                                   "on a CUDA machine, or use device=auto)")

    def _search_gpu(self, q: np.ndarray, k: int, nprobe: int, k_factor: int) -> tuple[np.ndarray, np.ndarray]:
        """Search a GPU replica of the CPU index (sharded over all GPUs); tombstones are compacted away first."""
        if len(self._dead):
            self.compact()
        if self._gpu_dirty or self._gpu is None:
            self._gpu = gpu_replica(self._kind, faiss.downcast_index(self._index.index))
            self._gpu_dirty = False
        return search_replica(self._gpu, self._kind, q, k, nprobe, k_factor)


def build(ids, vectors, config: IndexConfig | None = None, *, encoder_hash: str = "") -> VectorIndex:
    """A new index holding `vectors` (n, dim) under case `ids` (n,); `auto` picks the kind from n."""
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise VectorIndexError(f"build: vectors shape {tuple(v.shape)}, expected (n, dim)")
    index = VectorIndex(v.shape[1], config, encoder_hash=encoder_hash)
    index.add(ids, v)
    return index


def load(path: str | Path, expected_encoder_hash: str | None = None, **kwargs: Any) -> VectorIndex:
    """`VectorIndex.load`: read a saved index, refusing one built by another encoder."""
    return VectorIndex.load(path, expected_encoder_hash, **kwargs)


# ---- helpers ----------------------------------------------------------------------------------------------
def _auto_nlist(n: int) -> int:
    """Power of two nearest sqrt(n): list scans and k-means training both stay cheap on CPU."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _few(a, limit: int = 5) -> str:
    a = [int(v) for v in np.asarray(a).reshape(-1)]
    return ", ".join(map(str, a[:limit])) + (f" (+{len(a) - limit} more)" if len(a) > limit else "")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
