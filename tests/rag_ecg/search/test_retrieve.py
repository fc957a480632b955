"""Retrieval end to end on the session index (tests/conftest `tiny_index`, the briefly trained tiny encoder):
held-out charts find cases that share their labels, scores separate, and results do not depend on how
many threads torch runs (the fresh-machine failure: near-ties swapped under other thread settings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
from rag_ecg.data.store import Case
from rag_ecg.paper.digitize import DigitizeError
from rag_ecg.paper.render import render_page
from rag_ecg.reader.retrieval import RetrievalBackend
from rag_ecg.search.retrieve import NotAnECGError, Retriever

K = 8
N_HELD_OUT = 40


@pytest.fixture(scope="module")
def retriever(tiny_index, ingested_store):
    return Retriever.open(tiny_index["index"], ingested_store)


@pytest.fixture(scope="module")
def held_out(ptbxl_dir, ingested_store):
    """Clean pages of PTB-XL records outside the store (the last rows of the database), with their labels."""
    with ingested_store.session() as s:
        stored = {c.external_id for c in s.query(Case).filter(Case.source == "ptbxl")}
    rows = [r for r in read_ptbxl_index(ptbxl_dir)[0] if r.ecg_id not in stored and r.labels][-N_HELD_OUT:]
    pages = [render_page(ptbxl_record(r), preset="clean", seed=7, dpi=100) for r in rows]
    return rows, pages


def test_held_out_charts_retrieve_cases_that_share_their_labels(retriever, held_out):
    rows, pages = held_out
    library = [set(c.labels or []) for c in retriever._cases({int(i) for i in retriever.image_index.ids}).values()]
    evidence = retriever.search_images(pages, k=K, exclude_patients=[r.patient_id for r in rows])
    shared = [np.mean([bool(set(r.labels) & set(n.labels)) for n in ev.neighbours]) for r, ev in zip(rows, evidence)]
    chance = [np.mean([bool(set(r.labels) & lab) for lab in library]) for r in rows]  # a random library case
    assert np.mean(shared) > np.mean(chance) + 0.1, (np.mean(shared), np.mean(chance))
    top, kth = (np.array([ev.neighbours[i].score for ev in evidence]) for i in (0, K - 1))
    assert np.mean(top - kth) > 0.02 and np.all(top > kth)  # the best match clearly above the k-th, every query
    vectors = retriever.image_index.vectors(retriever.image_index.ids)
    sims = (vectors @ vectors.T)[np.triu_indices(len(vectors), 1)]
    assert sims.std() > 0.05 and sims.min() < 0.8  # library cases separate (untrained: all within 1e-6)


def test_results_do_not_depend_on_the_torch_thread_count(retriever, held_out):
    pages = held_out[1][:6]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            evidence = retriever.search_images(pages, k=K)
            runs.append([(ev.to_dict(), RetrievalBackend().compose(ev).to_dict()) for ev in evidence])
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for (ev1, report1), (ev2, report2) in zip(*runs):
        assert [n["case_id"] for n in ev1["neighbours"]] == [n["case_id"] for n in ev2["neighbours"]]
        assert [n["score"] for n in ev1["neighbours"]] == [n["score"] for n in ev2["neighbours"]]
        assert report1 == report2  # the same citations, in the same order


def test_the_similarity_floor_passes_real_pages_and_refuses_what_lies_far_from_the_library(retriever, held_out):
    floor = retriever.calibration.min_top_score
    assert floor is not None and -1.0 < floor < 1.0
    for ev in retriever.search_images(held_out[1][:10], k=K):
        retriever.check(ev)  # real ECG pages of other patients clear it
    vectors = retriever.image_index.vectors(retriever.image_index.ids)
    away = -vectors.mean(axis=0)  # the direction opposite the library's
    (ev,) = retriever.search_embeddings((away / np.linalg.norm(away))[None], k=K)
    assert ev.neighbours[0].score < floor
    with pytest.raises(NotAnECGError, match=r"below .*not an ECG\?"):
        retriever.check(ev)


def test_a_picture_with_no_trace_rows_is_refused_before_it_is_embedded(retriever):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x / 800 * 255, y / 600 * 200, (1 - x / 800) * 180], -1) + rng.normal(0, 25, (600, 800, 3))
    with pytest.raises(DigitizeError, match="no readable ECG traces"):  # an image tower embeds anything otherwise
        retriever.search_images([Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))], k=K)
