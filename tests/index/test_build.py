"""Index build job + retrieval on real records with a tiny encoder: self-retrieval, round trip, refusal, resume."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from index.build import KILL_AT, BuildConfig, build_index, staging_dir
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import InputError
from rag_ecg.paper.render import render_page
from rag_ecg.search.retrieve import Retriever
from rag_ecg.data.store import Case, load_case_record
from rag_ecg.search.index_files import IndexMismatchError
from rag_ecg.search.vector_index import VectorIndex

ROOT = Path(__file__).resolve().parents[2]


def _train_cases(store) -> list[Case]:
    with store.session() as s:
        return [c for c in s.scalars(select(Case).order_by(Case.id)) if c.split == "train"]


def test_index_holds_the_training_split_and_a_page_per_case(tiny_index, ingested_store):
    manifest = json.loads((tiny_index["index"] / "manifest.json").read_text())
    train = _train_cases(ingested_store)
    assert manifest["count"] == len(train) > 50
    ix = VectorIndex.load(tiny_index["index"] / "images.faiss")
    assert sorted(ix.ids.tolist()) == [c.id for c in train]  # no fold-9 or LUDB case leaks into the library
    assert all((tiny_index["index"] / "pages" / f"{c.id}.jpg").exists() for c in train)
    cal = manifest["calibration"]
    assert set(cal["platt"]) <= {"NORM", "MI", "STTC", "CD", "HYP"} and cal["min_top_score"] is not None


def test_a_cases_own_page_retrieves_itself_first(tiny_index, ingested_store):
    r = Retriever.open(tiny_index["index"], ingested_store)
    cases = _train_cases(ingested_store)[:5]
    dpi = r.manifest["build"]["dpi"]
    pages = []
    for c in cases:  # the exact page the build drew (same seed rule as index/build.py)
        seed = int(hashlib.sha256(f"{c.source}:{c.external_id}:0".encode()).hexdigest()[:8], 16)
        pages.append(render_page(load_case_record(c), preset="clean", seed=seed, dpi=dpi))
    cal = r.calibration
    for c, ev in zip(cases, r.search_images(pages, k=cal.k)):
        top = ev.neighbours
        # the very page it was indexed from: cosine 1, and the next case clearly further (the encoder separates)
        assert top[0].case_id == c.id and top[0].score == pytest.approx(1.0, abs=1e-3)
        assert top[1].score < top[0].score - 0.01 and ev.k == cal.k
        # the label scores are the Platt-calibrated softmax vote of these very neighbours, by hand
        s = np.array([n.score for n in top])
        w = np.exp((s - s.max()) / cal.temperature)
        w /= w.sum()
        for lab, p in ev.superclass_scores.items():
            vote = float(sum(wi for wi, n in zip(w, top) if lab in n.labels))
            a, b = (cal.platt or {}).get(lab, (None, None))
            want = vote if a is None else 1.0 / (1.0 + np.exp(-(a * vote + b)))
            assert p == pytest.approx(want, abs=1e-4), (lab, p, want)
    # excluding the query's patient removes it (and every other ECG of that patient)
    ev = r.search_images(pages[:1], k=5, exclude_patients=[cases[0].patient_id])[0]
    assert all(n.patient_id != cases[0].patient_id for n in ev.neighbours)


def test_save_load_round_trip_and_text_search(tiny_index, ingested_store):
    a = Retriever.open(tiny_index["index"], ingested_store)
    b = Retriever.open(tiny_index["index"], ingested_store)
    q = a.encoder.embed_texts(["sinus rhythm, inferior myocardial infarction"])
    ea, eb = a.search_embeddings(q, k=6), b.search_embeddings(q, k=6)
    assert ea[0].case_ids == eb[0].case_ids and [n.score for n in ea[0].neighbours] == [n.score for n in eb[0].neighbours]
    ev = a.search_texts(["sinusrhythmus normales ekg"], k=3)[0]
    assert len(ev.neighbours) == 3 and all(n.report for n in ev.neighbours)


def test_index_from_another_encoder_is_refused(tiny_index, ingested_store, tmp_path):
    other = tmp_path / "index"
    shutil.copytree(tiny_index["index"], other)
    shutil.rmtree(other / "encoder")
    ECGEncoder.create("ecg-clip-tiny", seed=1).save(other / "encoder")
    with pytest.raises(IndexMismatchError, match="built with encoder"):
        Retriever.open(other, ingested_store)


BUILD = """
import json, logging, sys
from index.build import BuildConfig, build_index
from rag_ecg.data.store import open_store
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
build_index(open_store(sys.argv[1]), sys.argv[2], out_dir=sys.argv[3],
            cfg=BuildConfig(workers=1, page_width=0, **json.loads(sys.argv[4])), progress=False)
"""


def _build(store, encoder, out: Path, kill_at: str | None = None, **cfg) -> subprocess.CompletedProcess:
    """`build_index` in a real process; `kill_at` SIGKILLs it at that step (index.build.KILL_AT)."""
    env = {k: v for k, v in os.environ.items() if k != KILL_AT}
    if kill_at:
        env[KILL_AT] = kill_at
    return subprocess.run([sys.executable, "-c", BUILD, store.url, str(encoder), str(out), json.dumps(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def _live(out: Path, store) -> tuple[int, int]:
    """(cases, generation) of the index that opens at `out` — opening checks every file and the store."""
    r = Retriever.open(out, store)
    assert r.image_index.ntotal == r.manifest["count"] == r.manifest.get("cases", {}).get("count", r.manifest["count"])
    return r.manifest["count"], r.manifest.get("generation", 0)


def test_a_rebuild_killed_at_each_step_leaves_an_index_that_opens_and_resumes(tiny_index, ingested_store, tmp_path):
    """kill -9 a rebuild after its first chunk, after its new manifest is written (before the swap) and after the
    swap (before the old index is deleted): each time the old or the new index opens, whole, and each run
    resumes the last one's work; a plain run then finishes with no leftovers and nothing re-embedded."""
    out = tmp_path / "idx"
    shutil.copytree(tiny_index["index"], out)  # the live index (other settings: page_width=400, all cases)
    before = (out / "manifest.json").read_bytes()
    old = _live(out, ingested_store)
    n = 24
    killed = _build(ingested_store, tiny_index["encoder"], out, kill_at="chunk", limit=n, chunk=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "manifest.json").read_bytes() == before and _live(out, ingested_store) == old  # still served
    assert json.loads((staging_dir(out) / "images.json").read_text())["count"] == 8
    # what a kill between a FAISS file's rename and its manifest's leaves: another file beside the old manifest
    shutil.copyfile(tiny_index["index"] / "images.faiss", staging_dir(out) / "images.faiss")
    seen = []
    for step, embedded in (("staged", 0), ("swapped", n)):  # the torn pair is not trusted: that build starts over
        killed = _build(ingested_store, tiny_index["encoder"], out, kill_at=step, limit=n, chunk=8)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert f"{embedded} already embedded" in killed.stdout  # resumed, not redone
        seen.append(_live(out, ingested_store))
    assert seen == [old, (n, old[1] + 1)]  # before the swap the old index, after it the new one
    done = _build(ingested_store, tiny_index["encoder"], out, limit=n, chunk=8)
    assert done.returncode == 0, done.stderr
    assert f"{n} already embedded" in done.stdout  # started from the live index's own vectors
    assert _live(out, ingested_store) == (n, old[1] + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging or swapped-out folder left
    rebuilt = VectorIndex.load(out / "images.faiss")
    full = VectorIndex.load(tiny_index["index"] / "images.faiss")
    ids = np.sort(rebuilt.ids)
    assert len(ids) == n and np.allclose(rebuilt.vectors(ids), full.vectors(ids), atol=1e-5)


def test_a_folder_that_is_not_an_index_is_not_replaced(tiny_index, ingested_store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an index folder"):
        build_index(ingested_store, tiny_index["encoder"], out_dir=tmp_path, cfg=BuildConfig(limit=4))
    assert (tmp_path / "notes.txt").read_text() == "mine"
