"""Real FAISS indexes on clustered vectors and on features of real PTB-XL ECGs: search, ids, persistence."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from rag_ecg.search.index_config import IndexConfig, VectorIndexError
from rag_ecg.search.index_files import IndexLoadError, IndexMismatchError, manifest_path
from rag_ecg.search.vector_index import VectorIndex, build, l2_normalise, load

DIM = 32
# tiny but real configs: 6-bit PQ (64 codes) trains on a few thousand vectors
SMALL = dict(nlist=16, nprobe=6, pq_m=8, k_factor=8, train_min=2000, hnsw_m=16,
             ef_construction=40, ef_search=48, device="cpu")
KINDS = ("flat", "ivfpq", "ivfpq6", "hnsw")  # ivfpq: 4-bit fast-scan (CPU default); ivfpq6: classic IVF-PQ codes


def config(kind: str, **over) -> IndexConfig:
    base = {**SMALL, "kind": kind}
    if kind == "ivfpq6":
        base.update(kind="ivfpq", pq_nbits=6)  # 64 codes a sub-quantizer train on a few thousand vectors
    return IndexConfig(**{**base, **over})


def clustered(n: int, dim: int = DIM, clusters: int = 40, seed: int = 0, centres_seed: int = 1) -> np.ndarray:
    """(n, dim) unit vectors around `clusters` centres with anisotropic spread: neighbourhoods exist."""
    crng, rng = np.random.default_rng(centres_seed), np.random.default_rng(seed)
    centres = l2_normalise(crng.standard_normal((clusters, dim)))
    axes = crng.standard_normal((clusters, 3, dim)).astype(np.float32) * 0.25
    c = rng.integers(0, clusters, n)
    x = centres[c] + np.einsum("nr,nrd->nd", rng.standard_normal((n, 3)).astype(np.float32), axes[c])
    x += 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return l2_normalise(x)


@pytest.fixture(scope="module")
def data():
    x = clustered(3000)
    ids = np.arange(3000, dtype=np.int64) * 11 + 1_000_000_007  # case ids unlike row numbers
    q = clustered(100, seed=5)  # same distribution, not in the base
    return ids, x, q


@pytest.fixture(scope="module")
def built(data):
    ids, x, _ = data
    return {kind: build(ids, x, config(kind), encoder_hash="enc-A") for kind in KINDS}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)]))


# ---- search ---------------------------------------------------------------------------------------------
def test_exact_search_finds_each_vector_itself_first(built, data):
    ids, x, _ = data
    index = built["flat"]
    assert index.kind == "flat" and index.ntotal == len(ids) == len(index)
    scores, found = index.search(x, 5)
    assert scores.shape == found.shape == (len(x), 5)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    assert np.array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "best first"


@pytest.mark.parametrize("kind", ["ivfpq", "ivfpq6", "hnsw"])
def test_ann_recall_against_flat_is_high_on_clustered_data(built, data, kind):
    _, _, q = data
    _, truth = built["flat"].search(q, 10)
    index = built[kind]
    assert index.kind == kind.rstrip("6")
    assert index.params.get("fast_scan", False) == (kind == "ivfpq")
    scores, found = index.search(q, 10)
    assert recall(found, truth) >= 0.9
    # scores are true cosines (IVF-PQ re-ranks exactly): the top hit's score equals the flat score for that id
    exact_scores, _ = built["flat"].search(q, 10)
    hit = found[:, 0] == truth[:, 0]
    np.testing.assert_allclose(scores[hit, 0], exact_scores[hit, 0], atol=1e-5)


def test_id_mapping_returns_case_ids(built, data):
    ids, x, _ = data
    for kind in KINDS:
        index = built[kind]
        assert np.array_equal(np.sort(index.ids), np.sort(ids))
        rows = np.array([0, 17, 2999])
        _, found = index.search(x[rows], 1)
        assert found[:, 0].tolist() == ids[rows].tolist(), kind
        assert int(ids[17]) in index and 17 not in index
        np.testing.assert_array_equal(index.vectors(ids[[5, 0, 2999]]), x[[5, 0, 2999]])  # exact, in given order
        with pytest.raises(VectorIndexError, match="not in the index: 17"):
            index.vectors([ids[1], 17])


def test_k_larger_than_index_pads_with_minus_one():
    x = clustered(5)
    index = build(np.array([10, 20, 30, 40, 50]), x, IndexConfig(kind="flat"))
    scores, found = index.search(x[0], 8)  # a single 1-D query is accepted
    assert found.shape == (1, 8)
    assert sorted(found[0, :5].tolist()) == [10, 20, 30, 40, 50]
    assert found[0, 5:].tolist() == [-1, -1, -1] and np.all(np.isneginf(scores[0, 5:]))
    empty = VectorIndex(DIM, IndexConfig(kind="hnsw"))
    s, f = empty.search(x[:2], 3)
    assert f.tolist() == [[-1] * 3] * 2 and np.all(np.isneginf(s))


# ---- add / remove ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_removed_ids_never_come_back(data, kind):
    ids, x, _ = data
    index = VectorIndex(DIM, config(kind, auto_compact_fraction=0.0), encoder_hash="enc-A")
    index.add(ids[:2500], x[:2500])  # incremental: two batches
    index.add(ids[2500:], x[2500:])
    assert index.ntotal == 3000 and index.kind == kind.rstrip("6")
    gone = ids[::7]
    assert index.remove(np.concatenate([gone, [123]])) == len(gone)  # unknown id ignored
    assert index.remove(gone) == 0
    assert index.ntotal == 3000 - len(gone)
    _, found = index.search(x[::7], 50)  # the removed vectors themselves as queries
    assert not np.isin(found, gone).any()
    assert (found[:, 0] >= 0).all()
    assert not np.isin(index.ids, gone).any() and int(gone[0]) not in index
    with pytest.raises(VectorIndexError, match="not in the index"):
        index.vectors(gone[:1])
    # a removed id can be added again (a re-embedded case) and is found again
    index.add(gone[:3], x[0:21:7])
    _, found = index.search(x[0:21:7], 1)
    assert found[:, 0].tolist() == gone[:3].tolist()
    # compaction drops the dead rows and keeps results
    before = index.search(x[:50], 5)[1]
    index.compact()
    assert index.ntotal == 3000 - len(gone) + 3
    assert np.array_equal(np.sort(index.ids), np.sort(np.concatenate([np.setdiff1d(ids, gone), gone[:3]])))
    after = index.search(x[:50], 5)[1]
    assert recall(after, before) >= 0.95


def test_auto_compaction_after_many_removals(data):
    ids, x, _ = data
    index = build(ids, x, IndexConfig(kind="hnsw", **{**SMALL, "auto_compact_fraction": 0.2}))
    index.remove(ids[:500])
    assert index.ntotal == 2500 and len(index._dead) == 500  # below the threshold: tombstones
    index.remove(ids[500:700])
    assert index.ntotal == 2300 and len(index._dead) == 0  # compacted
    _, found = index.search(x[:700], 10)
    assert not np.isin(found, ids[:700]).any()


def test_auto_kind_exact_below_threshold_then_ann(data):
    ids, x, q = data
    index = VectorIndex(DIM, IndexConfig(kind="auto", **{**SMALL, "auto_threshold": 2000}))
    index.add(ids[:1500], x[:1500])
    assert index.kind == "flat"
    index.add(ids[1500:], x[1500:])
    assert index.kind == "ivfpq" and index.ntotal == 3000
    _, found = index.search(x[:200], 1)
    assert np.mean(found[:, 0] == ids[:200]) >= 0.95  # approximate now: nearly every vector finds itself
    hnsw = build(ids, x, IndexConfig(kind="auto", **{**SMALL, "auto_threshold": 2000, "auto_large_kind": "hnsw"}))
    assert hnsw.kind == "hnsw"


def test_ivfpq_stays_exact_until_trainable_and_reduces_nlist(data):
    ids, x, _ = data
    cfg = IndexConfig(kind="ivfpq", **{**SMALL, "train_min": 2000, "nlist": 1024})
    index = VectorIndex(DIM, cfg)
    index.add(ids[:1000], x[:1000])
    assert index.kind == "flat"  # too few vectors to train: exact search meanwhile
    _, found = index.search(x[:1000], 1)
    assert np.array_equal(found[:, 0], ids[:1000])
    index.add(ids[1000:], x[1000:])
    assert index.kind == "ivfpq"
    assert index.params["nlist"] == 64 and index.params["nlist_wanted"] == 1024  # 3000 / 39 -> 64 lists
    assert any("nlist 1024 -> 64" in note for note in index.notes)


def test_ivfpq_retrains_when_grown(data):
    ids, x, _ = data
    cfg = IndexConfig(kind="ivfpq", **{**SMALL, "nlist": None, "train_min": 1000, "retrain_growth": 2.0})
    index = VectorIndex(DIM, cfg)
    index.add(ids[:1000], x[:1000])
    # sqrt(1000) -> 32 lists wanted, but 1000 vectors support only 16 (39 a list): reduced, and said so
    assert index.params["nlist"] == 16 and index.params["trained_at_rows"] == 1000
    assert any("nlist 32 -> 16" in note for note in index.notes)
    index.add(ids[1000:], x[1000:])
    assert index.params["trained_at_rows"] == 3000 and index.params["nlist"] == 64  # sqrt(3000) -> 64
    _, found = index.search(x[:100], 1)
    assert np.mean(found[:, 0] == ids[:100]) >= 0.95


# ---- persistence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_results(tmp_path, data, kind):
    ids, x, q = data
    index = build(ids, x, config(kind, auto_compact_fraction=0.0), encoder_hash="enc-A")
    index.remove(ids[:30])  # tombstones (ivfpq/hnsw) must survive the round trip too
    before = index.search(q, 10)
    path = index.save(tmp_path / "idx" / "vectors.faiss")
    assert path.is_file() and manifest_path(path).is_file()
    assert index.nbytes() == path.stat().st_size  # the in-memory byte count is what lands on disk
    m = json.loads(manifest_path(path).read_text())
    for key in ("kind", "dim", "metric", "count", "encoder_hash", "faiss_version", "created", "params"):
        assert key in m
    assert (m["kind"], m["dim"], m["metric"], m["count"], m["encoder_hash"]) == (kind.rstrip("6"), DIM, "inner_product",
                                                                                  2970, "enc-A")
    back = load(path, expected_encoder_hash="enc-A")
    after = back.search(q, 10)
    assert back.kind == kind.rstrip("6") and back.ntotal == 2970 and back.config == index.config
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
    back.add(ids[:5], x[:5])  # a loaded index stays usable
    assert back.search(x[:5], 1)[1][:, 0].tolist() == ids[:5].tolist()
    assert sorted(p.name for p in path.parent.iterdir()) == ["vectors.faiss", "vectors.json"]


def test_index_from_another_encoder_is_refused(tmp_path, built):
    path = built["flat"].save(tmp_path / "v.faiss")
    with pytest.raises(IndexMismatchError) as e:
        load(path, expected_encoder_hash="enc-B")
    assert "enc-A" in str(e.value) and "enc-B" in str(e.value) and str(path) in str(e.value)
    assert load(path).ntotal == 3000  # no expectation: loads


def test_interrupted_save_leaves_the_previous_pair(tmp_path, built, data, monkeypatch):
    _, _, q = data
    path = built["flat"].save(tmp_path / "v.faiss")
    old_bytes, old_manifest = path.read_bytes(), manifest_path(path).read_text()
    expected = built["flat"].search(q, 5)

    def crash(src, dst):  # the process dies before the rename: the temp files were written, not swapped in
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(VectorIndexError, match="cannot save"):
        built["hnsw"].save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes and manifest_path(path).read_text() == old_manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.faiss", "v.json"]  # temp files cleaned
    again = load(path)
    assert again.kind == "flat" and np.array_equal(again.search(q, 5)[1], expected[1])


def test_save_writes_temp_files_beside_then_renames(tmp_path, built, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    built["ivfpq"].save(tmp_path / "v.faiss")
    assert [d.name for _, d in seen] == ["v.faiss", "v.json"]  # index first, manifest last
    for src, dst in seen:
        assert src.parent == dst.parent and src.name.startswith(f".{dst.name}.") and src.suffix == ".tmp"


def test_load_errors_name_the_path(tmp_path, built):
    missing = tmp_path / "nope.faiss"
    with pytest.raises(IndexLoadError, match="nope.faiss: index file missing"):
        load(missing)
    path = built["flat"].save(tmp_path / "v.faiss")
    # truncated (an interrupted copy): size differs from the manifest
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexLoadError, match=r"v\.faiss: .* bytes but its manifest says"):
        load(path)
    # same size, corrupt content: checksum catches it; without the check FAISS refuses it
    path.write_bytes(b"\0" * len(data))
    with pytest.raises(IndexLoadError, match="checksum"):
        load(path)
    with pytest.raises(IndexLoadError, match="not a readable FAISS index"):
        load(path, verify=False)
    # a FAISS file without its manifest
    manifest_path(path).unlink()
    with pytest.raises(IndexLoadError, match="manifest missing"):
        load(path)
    manifest_path(path).write_text("{not json")
    with pytest.raises(IndexLoadError, match="manifest unreadable"):
        load(path)


# ---- validation -----------------------------------------------------------------------------------------
def test_bad_inputs_are_rejected_with_clear_errors(data):
    ids, x, _ = data
    index = build(ids[:100], x[:100], IndexConfig(kind="flat"))
    cases = [
        (lambda: index.add([1], l2_normalise(np.ones((1, DIM + 1)))), r"shape \(1, 33\), expected \(n, 32\)"),
        (lambda: index.add([1], np.full((1, DIM), np.nan, np.float32)), "NaN or infinity"),
        (lambda: index.add([1], x[:1] * 3), "L2 norm 3 .*L2-normalised"),
        (lambda: index.add([1, 1], clustered(2, seed=9)), "duplicate case id"),
        (lambda: index.add(ids[:1], x[:1]), "already in the index"),
        (lambda: index.add([-5], clustered(1, seed=9)), "negative case id"),
        (lambda: index.add([1, 2, 3], clustered(2, seed=9)), r"ids shape \(3,\), expected \(2,\)"),
        (lambda: index.add([1.5], clustered(1, seed=9)), "ids must be integers"),
        (lambda: index.search(x[:1], 0), "k=0"),
        (lambda: index.search(np.zeros((1, DIM)), 3), "L2 norm 0"),
        (lambda: index.search([["a"] * DIM], 3), "not a numeric array"),
        (lambda: IndexConfig(kind="lsh"), "kind='lsh'"),
        (lambda: index.save("/tmp/x.json"), "cannot end in .json"),
        (lambda: IndexConfig.from_dict({"nprobes": 3}), "unknown IndexConfig field"),
        (lambda: IndexConfig(device="gpu") and VectorIndex(DIM, IndexConfig(device="gpu")), "sees no GPU"),
        (lambda: VectorIndex(DIM, IndexConfig(kind="ivfpq", pq_m=5)), "pq_m=5: must divide the embedding dim 32"),
    ]
    for call, pattern in cases:
        with pytest.raises(VectorIndexError, match=pattern):
            call()
    assert index.ntotal == 100  # nothing half-added


def test_config_from_dict():
    cfg = IndexConfig.from_dict({"kind": "hnsw", "ef_search": 96, "hnsw_m": 24})
    assert (cfg.kind, cfg.ef_search, cfg.hnsw_m) == ("hnsw", 96, 24)
    assert IndexConfig.from_dict(cfg.to_dict()) == cfg
    # values as YAML or a command line give them (strings) become the numbers the fields declare
    assert IndexConfig.from_dict({"nprobe": "16", "retrain_growth": "4"}) == IndexConfig(nprobe=16, retrain_growth=4.0)


def test_l2_normalise():
    v = l2_normalise(np.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)
    assert v.dtype == np.float32
    with pytest.raises(VectorIndexError, match="zero vector"):
        l2_normalise(np.zeros((1, 3)))


# ---- real ECGs --------------------------------------------------------------------------------------------
def ecg_features(signal: np.ndarray) -> np.ndarray:
    """A fixed embedding of a (samples, 12) ECG: per-lead band-power profile, 12 x 8 = 96 values, unit norm."""
    spec = np.abs(np.fft.rfft(signal - signal.mean(axis=0), axis=0))[5:400]  # ~0.5-40 Hz at 100 Hz / 10 s
    bands = np.stack([b.mean(axis=0) for b in np.array_split(spec, 8, axis=0)], axis=1)  # (12, 8)
    return np.log1p(bands).reshape(-1)


def test_real_ptbxl_features_index(ptbxl_dir, tmp_path):
    from rag_ecg.data.records import ptbxl_record, read_ptbxl_index

    rows, _ = read_ptbxl_index(ptbxl_dir)
    rows = rows[:100]
    feats, case_ids = [], []
    for row in rows:
        rec = ptbxl_record(row)
        feats.append(ecg_features(rec.signal_mv()))
        case_ids.append(int(row.ecg_id))
    x = l2_normalise(np.stack(feats) - np.mean(feats, axis=0))  # centred: cosine compares shapes
    ids = np.array(case_ids, dtype=np.int64)
    flat = build(ids, x, IndexConfig(kind="flat"), encoder_hash="bandpower-v1")
    hnsw = build(ids, x, IndexConfig(kind="hnsw", hnsw_m=16), encoder_hash="bandpower-v1")
    _, f_flat = flat.search(x, 5)
    _, f_hnsw = hnsw.search(x, 5)
    assert np.array_equal(f_flat[:, 0], ids)  # every ECG finds itself first under its PTB-XL ecg_id
    assert recall(f_hnsw, f_flat) >= 0.95
    path = hnsw.save(tmp_path / "ptbxl.faiss")
    assert np.array_equal(load(path, expected_encoder_hash="bandpower-v1").search(x, 5)[1], f_hnsw)


# ---- the benchmark script runs end to end (tiny size; figures are printed, not asserted) -----------------
def test_bench_search_runs_tiny():
    script = Path(__file__).resolve().parents[3] / "bench" / "search.py"
    spec = importlib.util.spec_from_file_location("bench_search", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = bench.main(["--n", "3000", "--dim", "32", "--clusters", "50", "--queries", "50", "--nprobe", "4",
                      "--ef", "32", "--nlist", "32"])
    kinds = [r["kind"] for r in out["rows"]]
    assert kinds == ["flat", "ivfpq", "hnsw"]
    assert all(0.0 <= r["recall"] <= 1.0 and r["qps"] > 0 for r in out["rows"])
    assert out["rows"][0]["recall"] == 1.0
