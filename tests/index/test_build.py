"""Index build job + retrieval on real records with a tiny encoder: self-retrieval, round trip, refusal, resume."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from rag_ecg.encoder.model import ECGEncoder
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
    for c, ev in zip(cases, r.search_images(pages, k=5)):
        assert ev.neighbours[0].case_id == c.id and ev.neighbours[0].score > 0.999
        assert abs(sum(ev.superclass_scores.values())) > 0 and ev.k == 5
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
import logging, sys
from index.build import BuildConfig, build_index
from rag_ecg.data.store import open_store
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
build_index(open_store(sys.argv[1]), sys.argv[2], out_dir=sys.argv[3],
            cfg=BuildConfig(workers=1, chunk=8, page_width=0), progress=False)
"""


def test_killed_build_resumes_without_redoing_work(tiny_index, ingested_store, tmp_path):
    out = tmp_path / "idx"
    cmd = [sys.executable, "-c", BUILD, ingested_store.url, str(tiny_index["encoder"]), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as one chunk has been saved
        if (out / "images.json").exists() and json.loads((out / "images.json").read_text())["count"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # not finished
    partial = json.loads((out / "images.json").read_text())["count"]
    assert 8 <= partial < len(_train_cases(ingested_store))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert f"{partial} already embedded" in done.stdout
    resumed = VectorIndex.load(out / "images.faiss")
    full = VectorIndex.load(tiny_index["index"] / "images.faiss")
    ids = np.sort(full.ids)
    assert np.array_equal(np.sort(resumed.ids), ids)
    assert np.allclose(resumed.vectors(ids), full.vectors(ids), atol=1e-5)
