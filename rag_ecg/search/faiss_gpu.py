"""GPU search replicas of a CPU FAISS index (faiss-gpu only; the `[gpu]` extra on a CUDA machine).

The CPU index stays the master copy (it is what gets saved); a GPU replica is cloned from it for searching,
sharded over every visible GPU. Exact (`flat`) indexes clone as they are; IVF-PQ clones its 8-bit coarse +
PQ part to the GPUs and keeps the exact re-rank on CPU. HNSW and 4-bit fast-scan codes have no GPU form.
faiss-cpu has none of the GPU symbols: `num_gpus()` is then 0 and nothing here is reached.
"""
from __future__ import annotations

from typing import Any

import faiss
import numpy as np

GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def num_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def gpu_replica(kind: str, inner: Any) -> tuple[Any, dict[str, Any]]:
    """(search index, keepalive) cloned from the CPU structure `inner` of `kind` (flat | ivfpq)."""
    ngpu = num_gpus()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1  # split the rows over GPUs (IndexShards) rather than replicate them
    resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
    if kind == "flat":
        co.useFloat16 = False  # exact scores
        gpu = faiss.index_cpu_to_gpu_multiple_py(resources, inner, co)
        return gpu, {"res": resources}
    co.useFloat16 = True  # float16 PQ lookup tables: needed for 64-byte codes in shared memory
    base = faiss.index_cpu_to_gpu_multiple_py(resources, faiss.downcast_index(inner.base_index), co)
    refine = faiss.IndexRefine(base, faiss.downcast_index(inner.refine_index))  # exact re-rank on CPU
    return refine, {"res": resources, "base": base, "cpu": inner, "ps": faiss.GpuParameterSpace()}


def search_replica(replica: tuple[Any, dict[str, Any]], kind: str, q: np.ndarray, k: int, nprobe: int,
                   k_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, rows) of queries `q` on a `gpu_replica`, k capped at the GPU limit."""
    index, keep = replica
    if kind == "flat":
        return index.search(q, min(k, GPU_MAX_K))
    keep["ps"].set_index_parameter(keep["base"], "nprobe", nprobe)
    index.k_factor = float(max(1, min(k_factor, GPU_MAX_K // k)))
    return index.search(q, min(k, GPU_MAX_K))
