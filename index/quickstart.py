"""The one-command demo: ingest -> encoder (train or reuse) -> index -> review of fold-9 `photo` charts -> metrics.

Every step reuses what an earlier run finished (ingest is idempotent, a trained encoder and a finished index
are kept under the data folder, the review job resumes), so re-running costs little.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from sqlalchemy import select

from rag_ecg import paths
from rag_ecg.evaluate import labels_to_matrix, macro_auc, macro_f1, hamming_loss
from rag_ecg.records import SUPERCLASSES
from rag_ecg.store import Case, ReviewItem, Store


def ensure_encoder(store: Store, encoder: Path | None, minutes: float, log: Callable[[str], None]) -> Path:
    """A given checkpoint, else the quickstart's own (trained once with the CPU recipe, time-capped)."""
    if encoder:
        return Path(encoder)
    run_dir = paths.data_dir() / "runs" / "encoder-quickstart"
    from rag_ecg.encoder import ECGEncoder

    for cand in (run_dir / "final", run_dir / "best", run_dir):
        if (cand / "manifest.json").exists():
            try:
                ECGEncoder.load(cand)
                log(f"reusing encoder {cand}")
                return cand
            except Exception:  # an unfinished or foreign folder: train again
                pass
    from training.train_encoder import main

    log(f"training the CPU encoder for up to {minutes:g} minutes (training/configs/encoder_cpu.yaml)")
    return Path(main(paths.PROJECT_ROOT / "training/configs/encoder_cpu.yaml",
                     {"run_dir": str(run_dir), "max_minutes": minutes, "db": store.url}))


def ensure_index(store: Store, encoder: Path, name: str, log: Callable[[str], None]) -> Path:
    from index.build import build_index
    from rag_ecg.encoder import ECGEncoder

    folder = paths.index_dir() / name
    manifest = folder / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("encoder_hash") == \
            ECGEncoder.load(encoder).checkpoint_hash:
        log(f"reusing index {folder}")
        return folder
    return build_index(store, encoder, name=name, log=log)


def review_metrics(store: Store, job_id: int) -> dict:
    """Superclass detection of the retrieval reader vs the cases' own labels (ECGBench-style metrics)."""
    with store.session() as s:
        items = s.execute(select(ReviewItem.chart_key, ReviewItem.report, ReviewItem.status)
                          .where(ReviewItem.job_id == job_id)).all()
        ids = [int(k.split(":", 1)[1]) for k, _, st in items if st == "done" and k.startswith("case:")]
        labels = {c.id: c.labels or [] for c in s.scalars(select(Case).where(Case.id.in_(ids)))}
    truth, scores, preds, cites_ok = [], [], [], []
    for key, rep, status in items:
        if status != "done" or not key.startswith("case:"):
            continue
        conf = {d.get("superclass"): float(d.get("confidence") or 0) for d in rep.get("diagnoses", [])
                if d.get("superclass")}
        probs = rep.get("retrieval", {}).get("superclass_scores") or {}
        truth.append(labels[int(key.split(":", 1)[1])])
        scores.append([float(probs.get(c, conf.get(c, 0.0))) for c in SUPERCLASSES])
        preds.append([c in conf for c in SUPERCLASSES])
        retrieved = {c["case_id"] for c in rep.get("retrieval", {}).get("cases", [])}
        cited = {i for d in rep.get("diagnoses", []) for i in d.get("cited", [])}
        cites_ok.append(cited <= retrieved)
    if not truth:
        return {"charts": 0}
    y = labels_to_matrix(truth, SUPERCLASSES)
    s_, p = np.array(scores), np.array(preds, dtype=float)
    return {"charts": len(truth), "macro_auc_scores": macro_auc(y, s_), "macro_auc_binary": macro_auc(y, p),
            "macro_f1": macro_f1(y, p), "hamming_loss": hamming_loss(y, p),
            "citations_valid": float(np.mean(cites_ok))}


def run(store: Store, data: Path, encoder: Path | None = None, minutes: float = 8.0, charts: int = 60,
        index_name: str = "default", log: Callable[[str], None] = print) -> dict:
    from index.ingest import ingest
    from rag_ecg.review import review

    found = [(n, data / n) for n in ("ptbxl", "ludb") if (data / n).is_dir()]
    if not found:
        raise FileNotFoundError(f"{data}: no ptbxl/ or ludb/ folder (pass --data)")
    for name, folder in found:
        res = ingest(store, name, folder, log=log)
        log(f"{name}: {res.inserted} new, {res.updated} updated, {len(res.skipped)} skipped")
    enc = ensure_encoder(store, encoder, minutes, log)
    index = ensure_index(store, enc, index_name, log)
    out = paths.data_dir() / "quickstart" / "review"
    summary = review(f"store:source=ptbxl,fold=9,limit={charts}", out, store=store, index_dir=index,
                     backend="retrieval", preset="photo", workers=min(2, os.cpu_count() or 1),
                     backend_options={"threshold": None})  # None: the F1-best thresholds fitted on the library
    metrics = review_metrics(store, summary.job_id)
    result = {"encoder": str(enc), "index": str(index), "review_html": str(out / "index.html"),
              "review": summary.to_dict(), "metrics": metrics}
    (paths.data_dir() / "quickstart" / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    return result
