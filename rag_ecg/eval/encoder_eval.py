"""Encoder evaluation: render the validation fold as query pictures and the training folds as the library
(the way the index will), embed both, and score retrieval and kNN superclass classification per preset.

Seeds are stable per record (`record_seed`), so the same encoder gets the same figures on every run and
machine; rendering can run in forked worker processes while this one embeds.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
from collections.abc import Sequence

import numpy as np

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.records import ECGRecord
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.encoder.text import case_text
from rag_ecg.errors import InputError
from rag_ecg.eval.metrics import knn_classification, labels_to_matrix, recall_at_k
from rag_ecg.paper.render import render_page

log = logging.getLogger(__name__)


def record_seed(record_id: str, salt: str = "") -> int:
    """A stable 31-bit render seed for a record (same page every run, on every machine)."""
    return int.from_bytes(hashlib.sha256(f"{salt}{record_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _render_pixels(args) -> np.ndarray:
    """Worker: render one record and letterbox it for the encoder -> (H, W, 3) uint8."""
    rec, preset, seed, dpi, preprocess = args
    kwargs = {"preset": preset, "seed": seed}
    if dpi is not None:
        kwargs["dpi"] = dpi
    return preprocess.pixels(render_page(rec, **kwargs), strict=False)


def embed_rendered(encoder: ECGEncoder, records: Sequence[ECGRecord], preset: str, salt: str = "",
                   dpi: int | None = None, batch_size: int = 32, workers: int = 0) -> np.ndarray:
    """Render each record with `preset` (seed stable per record and salt) and embed: (n, d) float32.

    `workers` > 0 renders in that many processes while this one embeds (renders dominate on CPU).
    """
    jobs = [(r, preset, record_seed(r.record_id, salt), dpi, encoder.preprocess) for r in records]
    chunks, batch = [], []
    pool = None
    if workers > 0 and len(jobs) > 1:
        pool = mp.get_context("fork").Pool(workers)
        pages = pool.imap(_render_pixels, jobs, chunksize=4)
    else:
        pages = map(_render_pixels, jobs)
    try:
        for px in pages:
            batch.append(px)
            if len(batch) == batch_size:
                chunks.append(encoder.embed_pixels(np.stack(batch)))
                batch = []
        if batch:
            chunks.append(encoder.embed_pixels(np.stack(batch)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)


def evaluate_encoder(encoder: ECGEncoder, train_cases: Sequence[ECGRecord],
                     val_cases: Sequence[ECGRecord], preset: str | Sequence[str] = ("random", "clean"),
                     k: int = 10, temperature: float = 0.05, library_preset: str = "clean",
                     descriptions: dict[str, str] | None = None, dpi: int | None = 100,
                     batch_size: int = 32, workers: int = 0, classes: Sequence[str] = SUPERCLASSES,
                     ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Render, embed and score: validation-fold queries against the training-fold library, per query preset.

    The library is rendered with `library_preset` ("clean" by default, as the index renders reference
    signals) and per-record seeds; queries are rendered with each preset in `preset`, seeds salted by
    the preset name. kNN votes exclude library cases of the query's own patient; thresholds for the
    binarised metrics come from leave-one-patient-out votes on the library alone. Image->report and
    report->image recall use the validation cases' texts, identical texts counting as the same report.
    Returns {"library_size", "n_queries", ..., <preset>: {auc, auc_binarized, f1, hamming, per_class,
    loo_library_auc, image_to_report: {R@k}, report_to_image: {R@k}}}; metrics are floats in [0, 1].
    """
    presets = [preset] if isinstance(preset, str) else list(preset)
    descriptions = descriptions or {}
    if not train_cases or not val_cases:
        raise InputError(f"evaluate_encoder: need library and query cases (got {len(train_cases)} "
                         f"and {len(val_cases)})")
    y_ref = labels_to_matrix([c.labels for c in train_cases], classes)
    y_val = labels_to_matrix([c.labels for c in val_cases], classes)
    ref_groups = [c.patient_id or c.record_id for c in train_cases]
    val_groups = [c.patient_id or c.record_id for c in val_cases]

    log.info("embedding the library: %d pages (%s)", len(train_cases), library_preset)
    ref = embed_rendered(encoder, train_cases, library_preset, "library", dpi, batch_size, workers)
    texts = [case_text(c.report, c.codes, descriptions) for c in val_cases]
    uniq = sorted(set(texts))
    pos = {t: i for i, t in enumerate(uniq)}
    txt = encoder.embed_texts(uniq, batch_size)
    text_idx = np.array([pos[t] for t in texts])
    rel_i2t = text_idx[:, None] == np.arange(len(uniq))[None, :]  # image -> its report (identical texts are one)

    out: dict = {"library_size": len(train_cases), "n_queries": len(val_cases), "k": k,
                 "library_preset": library_preset, "n_unique_reports": len(uniq)}
    for p in presets:
        log.info("embedding %d queries (%s)", len(val_cases), p)
        q = embed_rendered(encoder, val_cases, p, f"query-{p}", dpi, batch_size, workers)
        res = knn_classification(q, y_val, ref, y_ref, k, temperature, val_groups, ref_groups, classes)
        sim = q @ txt.T
        res["image_to_report"] = recall_at_k(sim, rel_i2t, ks)
        res["report_to_image"] = recall_at_k(sim.T, rel_i2t.T, ks)
        out[p] = res
    return out


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics dict -> {"random/auc": 0.87, ...} of numbers only (for JSONL logs and manifests)."""
    flat: dict[str, float] = {}
    for key, v in result.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            flat.update(flat_metrics(v, name + "/"))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            flat[name] = float(v)
    return flat
