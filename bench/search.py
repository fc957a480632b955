"""ANN benchmark: build time, memory, queries/s and recall@10 of `ivfpq` and `hnsw` against exact `flat`.

Why: the index must stay interactive at 10^6 cases on a 2-core CPU; the target is recall@10 >= 0.95 at >= 20x
the exact index's queries/s, measured here against a flat baseline built in the same run on the same data.

Data behave like image embeddings, not uniform noise (uniform vectors have no true neighbourhoods): a shared
mean direction (embeddings sit in a cone), a few super-classes, a few thousand class centres around them
with long-tailed sizes, and per-class anisotropic spread (a low-rank set of principal axes with decaying
scales plus small isotropic noise), L2-normalised. Queries come from the same process but are not in the base.

    python bench/search.py              # 1,000,000 x 512 (several minutes; HNSW build dominates)
    python bench/search.py --quick      # 100,000 x 512

Text search (`--text`): precision@8 of one query per SCP statement, the statement's English description,
for every statement with >= 8 cases in the library (the training folds; the index's cases with --index);
relevant = cases carrying that statement at any likelihood (PTB-XL records every rhythm and form statement
with likelihood 0). Lexical (statements recognised), lexical on words only, text tower, and their RRF fusion.

    python bench/search.py --text                                   # PTB-XL ingested into a store here
    python bench/search.py --text --db sqlite:///data/rag_ecg.db --index index/default   # + tower, fused
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.ingest import ingest  # noqa: E402
from rag_ecg import paths  # noqa: E402
from rag_ecg.data.store import Case, open_store, scp_descriptions  # noqa: E402
from rag_ecg.search.index_config import IndexConfig  # noqa: E402
from rag_ecg.search.retrieve import Retriever  # noqa: E402
from rag_ecg.search.text_search import WEIGHTS, TextSearch, rrf  # noqa: E402
from rag_ecg.search.vector_index import VectorIndex  # noqa: E402


@dataclass
class ClusteredSpec:
    """Shape of the synthetic embedding distribution (defaults give cosine stats like CLIP-style embeddings)."""

    dim: int = 512  # embedding width
    clusters: int = 4000  # class centres ("a few thousand")
    supers: int = 24  # super-classes the centres gather around
    rank: int = 12  # principal axes of each class's own spread (anisotropy)
    cone: float = 1.2  # weight of the shared mean direction (embeddings occupy a cone, not the whole sphere)
    super_spread: float = 1.0  # spread of super-class directions around the mean
    centre_spread: float = 0.7  # spread of class centres around their super-class
    axis_scale: float = 0.45  # std along a class's first principal axis (later axes decay as 1/sqrt(j))
    noise: float = 0.012  # isotropic per-coordinate noise (std) on top: total ~ noise * sqrt(dim)
    size_sigma: float = 1.0  # lognormal sigma of class sizes (long tail of rare classes)


class ClusteredEmbeddings:
    """Sampler of embedding-like unit vectors; `sample(n, seed)` draws (n, dim) float32 rows."""

    def __init__(self, spec: ClusteredSpec, seed: int = 0) -> None:
        self.spec = s = spec
        rng = np.random.default_rng(seed)
        unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        g = lambda *shape: rng.standard_normal(shape, dtype=np.float32) / np.sqrt(s.dim)  # noqa: E731
        mean = unit(rng.standard_normal(s.dim).astype(np.float32))
        supers = unit(s.cone * mean + s.super_spread * g(s.supers, s.dim))
        owner = rng.integers(0, s.supers, s.clusters)
        self.centres = unit(supers[owner] + s.centre_spread * g(s.clusters, s.dim)).astype(np.float32)
        # per-class principal axes (rank, dim) scaled by decaying std; not orthogonalised (random ~ orthogonal)
        scales = (s.axis_scale / np.sqrt(np.arange(1, s.rank + 1))).astype(np.float32)
        self.axes = (rng.standard_normal((s.clusters, s.rank, s.dim), dtype=np.float32) / np.sqrt(s.dim)
                     * scales[None, :, None])
        w = rng.lognormal(0.0, s.size_sigma, s.clusters)
        self.weights = w / w.sum()

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(n, dim) float32 unit rows, rows in random class order."""
        s, rng = self.spec, np.random.default_rng(seed)
        counts = rng.multinomial(n, self.weights)
        out = np.empty((n, s.dim), dtype=np.float32)
        perm = rng.permutation(n)
        start = 0
        for c in np.flatnonzero(counts):
            m = counts[c]
            coef = rng.standard_normal((m, s.rank), dtype=np.float32)
            block = self.centres[c] + coef @ self.axes[c]
            block += s.noise * rng.standard_normal((m, s.dim), dtype=np.float32)
            out[perm[start:start + m]] = block
            start += m
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k ids (n, k) that appear in the found top-k ids (n, k)."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth)]))


def timed_search(index: VectorIndex, q: np.ndarray, k: int, repeat: int = 1,
                 **kw) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Queries per wall second and per CPU second of one batched search (best of `repeat`), and its results.

    CPU seconds (all threads of this process) make the ratio to flat robust to other load on a shared machine,
    where wall-clock q/s of a long exact search and of a short ANN search see different contention.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        scores, ids = index.search(q, k, **kw)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return len(q) / best_wall, len(q) / max(best_cpu, 1e-9), scores, ids


def build(kind: str, x: np.ndarray, ids: np.ndarray, cfg: dict) -> tuple[VectorIndex, float, int]:
    """A built index, its build seconds (training included) and the RSS it added."""
    gc.collect()
    rss0, t0 = rss_bytes(), time.perf_counter()
    index = VectorIndex(x.shape[1], IndexConfig(kind=kind, device="cpu", **cfg))
    index.add(ids, x)
    return index, time.perf_counter() - t0, rss_bytes() - rss0


SHORTHAND_QUERIES = [("inferior MI", "IMI"), ("anteroseptal MI", "ASMI"), ("anterior MI", "AMI"),
                     ("lateral MI", "LMI"), ("inferolateral MI", "ILMI"), ("anterolateral MI", "ALMI"),
                     ("LVH", "LVH"), ("LVH by voltage", "VCLVH"), ("RBBB", "CRBBB"), ("incomplete RBBB", "IRBBB"),
                     ("LBBB", "CLBBB"), ("LAFB", "LAFB"), ("LPFB", "LPFB"), ("1AVB", "1AVB"), ("AF", "AFIB"),
                     ("PVCs", "PVC"), ("PACs", "PAC"), ("LAE", "LAO/LAE"), ("IVCD", "IVCD"),
                     ("sinus tachy", "STACH"), ("brady", "SBRAD"), ("digoxin effect", "DIG"),
                     ("inferior ischemia", "ISCIN"), ("ST depression", "STD_"), ("T inversion", "INVT")]


def text_main(argv: list[str]) -> dict:
    """precision@8 per SCP statement: lexical, words only, text tower and fused (see the module docstring)."""
    ap = argparse.ArgumentParser(description="text search: precision@8 per SCP statement")
    ap.add_argument("--text", action="store_true")
    ap.add_argument("--db", help="case store (default --workdir/store.db; PTB-XL is ingested into an empty one)")
    ap.add_argument("--index", type=Path, help="an index built from --db: adds the text tower and the fusion")
    ap.add_argument("--workdir", type=Path, default=paths.data_dir() / "bench-text")
    ap.add_argument("--min-cases", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    console = Console(width=160)
    if not a.db:
        a.workdir.mkdir(parents=True, exist_ok=True)
    store = open_store(a.db or f"sqlite:///{a.workdir / 'store.db'}")
    if not store.count("ptbxl"):  # an empty store: the real PTB-XL records first
        ingest(store, "ptbxl", paths.shared_data_dir() / "ptbxl", progress=False)
    retriever = Retriever.open(a.index, store) if a.index else None
    with store.session() as s:
        cases = [(c.id, set(c.codes or {})) for c in s.query(Case) if c.split == "train" or retriever]
        desc = scp_descriptions(s)
    t0 = time.perf_counter()
    search = TextSearch(store, retriever, library=None if retriever else [i for i, _ in cases])
    library = search.library
    has = {i: codes for i, codes in cases if i in library}
    counts = {code: sum(code in c for c in has.values()) for code in desc}
    statements = sorted((c for c, n in counts.items() if n >= a.min_cases), key=lambda c: (-counts[c], c))
    # name -> (lexical ranking, weights): the default, the same on words only, and plain (1:1) RRF for reference
    fusions = {"fused": ("lexical", WEIGHTS), "fused, words only": ("words only", WEIGHTS),
               "fused 1:1": ("lexical", (1.0, 1.0))}
    methods = ["lexical", "words only"] + (["tower", *fusions] if retriever else [])
    rows = []
    for code in statements:
        ranks = search.rankings(desc[code])
        ranks["words only"] = search.rankings(desc[code], recognise=False)["lexical"]
        got = {m: [c for c, _ in ranks[m]] for m in ("lexical", "words only")}
        if retriever:
            got["tower"] = [c for c, _ in ranks["tower"]]
            for name, (lex, w) in fusions.items():
                got[name] = [c for c, _ in rrf([ranks[lex], ranks["tower"]], w)]
        rows.append(dict(code=code, description=desc[code], cases=counts[code],
                         **{m: sum(code in has[c] for c in got[m][:a.k]) / a.k for m in methods}))
    short = []
    for query, code in SHORTHAND_QUERIES:  # what a clinician types: shorthand, codes, plurals
        if counts.get(code, 0) >= a.min_cases:
            ranks = search.rankings(query)
            got = {"lexical": ranks["lexical"]}
            if retriever:
                got.update(tower=ranks["tower"], fused=rrf([ranks["lexical"], ranks["tower"]], WEIGHTS))
            short.append(dict(query=query, code=code, cases=counts[code],
                              **{m: sum(code in has[c] for c, _ in r[:a.k]) / a.k for m, r in got.items()}))
    seconds = time.perf_counter() - t0
    table = Table(title=f"text search: precision@{a.k} per SCP statement (query = its description), "
                        f"{len(library)} library cases, statements with >= {a.min_cases} cases")
    for col in ["code", "description", "cases"] + methods:
        table.add_column(col, justify="left" if col in ("code", "description") else "right")
    for r in rows:
        table.add_row(r["code"], r["description"][:48], str(r["cases"]), *[f"{r[m]:.2f}" for m in methods])
    means = {m: float(np.mean([r[m] for r in rows])) if rows else float("nan") for m in methods}
    reached = {m: sum(r[m] >= 0.8 for r in rows) for m in methods}
    table.add_row("mean", f"{len(rows)} statements", "", *[f"{means[m]:.3f}" for m in methods], style="bold")
    table.add_row(">= 0.8", "statements at the target", "", *[str(reached[m]) for m in methods])
    console.print(table)
    if short:
        cols = [m for m in ("lexical", "tower", "fused") if m in short[0]]
        t2 = Table(title=f"shorthand queries: precision@{a.k} (relevant = the statement named)")
        for col in ["query", "statement", "cases", *cols]:
            t2.add_column(col, justify="left" if col in ("query", "statement") else "right")
        for r in short:
            t2.add_row(r["query"], r["code"], str(r["cases"]), *[f"{r[m]:.2f}" for m in cols])
        t2.add_row("mean", f"{len(short)} queries", "", *[f"{np.mean([r[m] for r in short]):.3f}" for m in cols],
                   style="bold")
        console.print(t2)
    fused = f"; fused = RRF (k 60) of lexical and tower weighted {WEIGHTS[0]}:{WEIGHTS[1]}" if retriever else ""
    console.print(f"{store.engine.dialect.name}: {len(rows)} queries, {len(methods)} rankings each, in {seconds:.1f} s"
                  f"{fused}; target: precision@{a.k} >= 0.8 per statement")
    result = dict(k=a.k, library=len(library), min_cases=a.min_cases, means=means, reached=reached, rows=rows,
                  shorthand=short)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--text" in argv:
        return text_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="base vectors (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 base vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=4000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="ivfpq,hnsw", help="ANN kinds to compare with flat")
    ap.add_argument("--nprobe", default="2,4,8,16", help="ivfpq nprobe values to sweep")
    ap.add_argument("--ef", default="16,32,64,128", help="hnsw efSearch values to sweep")
    ap.add_argument("--nlist", type=int, default=None, help="ivfpq nlist (default: the index's auto choice)")
    ap.add_argument("--k-factor", type=int, default=None, help="ivfpq re-rank factor (default: config)")
    ap.add_argument("--hnsw-m", type=int, default=None)
    ap.add_argument("--ef-construction", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    n = 100_000 if a.quick else a.n

    console = Console(width=160)
    load0 = os.getloadavg()
    console.print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cores, "
                  f"load avg {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}")
    t0 = time.perf_counter()
    gen = ClusteredEmbeddings(ClusteredSpec(dim=a.dim, clusters=a.clusters), seed=a.seed)
    x = gen.sample(n, seed=a.seed + 1)
    q = gen.sample(a.queries, seed=a.seed + 2)
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # case ids unlike row numbers, so the mapping is exercised
    console.print(f"data: {n:,} x {a.dim} base, {a.queries:,} queries, {a.clusters} clusters "
                  f"({time.perf_counter() - t0:.1f} s)")

    rows: list[dict] = []
    flat, bt, drss = build("flat", x, ids, {})
    flat_qps, flat_cpu_qps, fs, truth = timed_search(flat, q, a.k)
    rows.append(dict(kind="flat", setting="IndexFlatIP", search="exact", build_s=bt, index_mb=flat.nbytes() / 2**20,
                     rss_mb=drss / 2**20, qps=flat_qps, cpu_qps=flat_cpu_qps, recall=1.0))
    rnd = x[np.random.default_rng(a.seed + 3).integers(0, n, a.queries)]
    stats = dict(cos_top1=float(fs[:, 0].mean()), cos_top10=float(fs[:, -1].mean()),
                 cos_random=float(np.mean(np.sum(q * rnd, axis=1))))
    console.print(f"cosine query->1st NN {stats['cos_top1']:.3f}, ->10th NN {stats['cos_top10']:.3f}, "
                  f"->random case {stats['cos_random']:.3f}")
    del flat
    gc.collect()

    for kind in [k.strip() for k in a.kinds.split(",") if k.strip()]:
        cfg: dict = {}
        if kind == "ivfpq":
            cfg.update(train_min=1)
            if a.nlist:
                cfg["nlist"] = a.nlist
            if a.k_factor:
                cfg["k_factor"] = a.k_factor
            sweep = [("nprobe", int(v)) for v in a.nprobe.split(",")]
        elif kind == "hnsw":
            if a.hnsw_m:
                cfg["hnsw_m"] = a.hnsw_m
            if a.ef_construction:
                cfg["ef_construction"] = a.ef_construction
            sweep = [("ef_search", int(v)) for v in a.ef.split(",")]
        else:
            raise SystemExit(f"--kinds: unknown kind {kind!r} (ivfpq, hnsw)")
        index, bt, drss = build(kind, x, ids, cfg)
        mb = index.nbytes() / 2**20
        p = index.params
        label = (f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_nbits']}{'fs' if p.get('fast_scan') else ''},"
                 f"RFlat kf={index.config.k_factor}" if kind == "ivfpq" else f"HNSW{p['M']} efC={p['efConstruction']}")
        for name, value in sweep:
            qps, cpu_qps, _, found = timed_search(index, q, a.k, repeat=2, **{name: value})
            rows.append(dict(kind=kind, setting=label, search=f"{name}={value}", build_s=bt, index_mb=mb,
                             rss_mb=drss / 2**20, qps=qps, cpu_qps=cpu_qps, recall=recall_at_k(found, truth)))
        del index
        gc.collect()

    table = Table(title=f"ANN vs exact: {n:,} x {a.dim}, {a.queries:,} queries, recall@{a.k}")
    for col in ("kind", "structure", "search", "build s", "index MiB", "RSS +MiB", "q/s", "x flat", "q/CPU-s",
                "x flat CPU", f"recall@{a.k}", "target"):
        table.add_column(col, justify="left" if col in ("kind", "structure", "search") else "right")
    for r in rows:
        r["speedup"] = r["qps"] / flat_qps
        r["cpu_speedup"] = r["cpu_qps"] / flat_cpu_qps
        r["meets_target"] = r["kind"] != "flat" and r["recall"] >= 0.95 and min(r["speedup"], r["cpu_speedup"]) >= 20
        table.add_row(r["kind"], r["setting"], r["search"], f"{r['build_s']:.1f}", f"{r['index_mb']:.0f}",
                      f"{r['rss_mb']:.0f}", f"{r['qps']:,.0f}", f"{r['speedup']:.1f}", f"{r['cpu_qps']:,.0f}",
                      f"{r['cpu_speedup']:.1f}", f"{r['recall']:.3f}",
                      "" if r["kind"] == "flat" else ("yes" if r["meets_target"] else "no"))
    console.print(table)
    load1 = os.getloadavg()
    console.print(f"target: recall@{a.k} >= 0.95 at >= 20x flat q/s (wall and CPU); load avg at end {load1[0]:.2f}/"
                  f"{load1[1]:.2f}/{load1[2]:.2f}; total {time.perf_counter() - t0:.0f} s")
    result = dict(n=n, dim=a.dim, queries=a.queries, k=a.k, clusters=a.clusters, faiss=faiss.__version__,
                  threads=faiss.omp_get_max_threads(), load_start=load0, load_end=load1, data=stats, rows=rows)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
