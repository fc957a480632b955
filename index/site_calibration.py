"""Site calibration job: refit an index's probabilities and thresholds on a hospital's own labelled charts.

Why: the index build fits the reader's probabilities on PTB-XL fold 9, so they are right for PTB-XL's label mix
and drawings. Another hospital's mix can be far off (LUDB: HYP 84 %, NORM 4 %; expected calibration error 0.31
there), and so are its thresholds. `python cli.py calibrate --data SET` reads a labelled set the way a review reads
charts (pictures digitised, WFDB records drawn under `preset` and read back), computes the same neighbour votes
and encoder-head logits the reader fuses, recalibrates each label's probability (a Platt step on the build's,
so the order of charts and the AUC stay the build's) and refits the F1-best thresholds on them, and saves
`site_calibration.json` in the index folder; every later search, review and eval uses it (and says so in the
index identity, so review jobs made before are not mixed with jobs after). Labels the set holds no positive or
no negative of keep the build's fit. The similarity scale and not-an-ECG floor stay the build's. `--reset`
removes the file. Fit on charts you will not evaluate on.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import select

from index.build import votes_and_head
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case, Store
from rag_ecg.errors import InputError
from rag_ecg.eval.metrics import labels_to_matrix
from rag_ecg.eval.pipeline import LabelledSet
from rag_ecg.io import write_json
from rag_ecg.review.loader import Loader, LoadTask
from rag_ecg.search.calibration import SITE_CALIBRATION, fit_site as recalibrate
from rag_ecg.search.retrieve import Retriever

log = logging.getLogger(__name__)

MIN_CHARTS = 20  # fewer labelled charts than this say too little to refit on


def fit_site(labelled: LabelledSet, index_dir: Path, store: Store, preset: str = "photo", workers: int = 2,
             min_charts: int = MIN_CHARTS, batch: int = 16) -> dict:
    """Read `labelled`'s charts, refit the index's calibration on them, write `site_calibration.json`; returns
    what was written (plus `unread`: one line per chart that could not be read)."""
    index_dir = Path(index_dir)
    loader = Loader(workers).start()  # forked before the encoder loads (see Loader.start)
    try:
        ret = Retriever.open(index_dir, store, library_calibration=True)
    except BaseException:
        loader.close()
        raise
    kind = "image" if labelled.kind == "images" else "wfdb"
    tasks = [LoadTask(i, c.path, c.path if kind == "image" else str(Path(c.path).with_suffix("")), kind, {},
                      ret.encoder.preprocess, preset, 100, 64, 0) for i, c in enumerate(labelled.charts)]
    pixels, kept, unread = [], [], []
    try:
        for _, loaded in loader.batches((None, tasks[i:i + batch]) for i in range(0, len(tasks), batch)):
            for x in loaded:
                if x.error:
                    unread.append(x.error)
                else:
                    pixels.append(x.pixels)
                    kept.append(labelled.charts[x.item_id])
    finally:
        loader.close()
    if len(kept) < min_charts:
        raise InputError(f"{labelled.name}: {len(kept)} charts read, {min_charts} needed to calibrate on"
                         + (f" ({unread[0]})" if unread else ""))
    emb = ret.encoder.embed_pixels(np.stack(pixels))
    with store.session() as s:
        labels = {c.id: c.labels or [] for c in s.scalars(select(Case).where(Case.id.in_(
            [int(i) for i in ret.image_index.ids])))}
    cal = ret.calibration
    votes, head = votes_and_head(emb, ret.image_index, labels, cal.k, cal.temperature, ret.encoder)
    y = labels_to_matrix([c.labels for c in kept], SUPERCLASSES)
    how = "as they are" if kind == "image" else f"drawn as '{preset}' pages"
    fitted = recalibrate(cal, votes, head if cal.fusion else None, y, SUPERCLASSES,
                         f"{len(kept)} charts of {labelled.name} ({how}; site recalibration of {cal.fitted_on})")
    refit = [lab for j, lab in enumerate(SUPERCLASSES) if 0 < y[:, j].sum() < len(y)]
    out = {"set": labelled.name, "charts": len(kept), "preset": None if kind == "image" else preset,
           "refitted": refit, "prevalence": dict(zip(SUPERCLASSES, map(float, y.mean(0)))),
           "encoder_hash": ret.encoder.checkpoint_hash, "fitted_at": datetime.now(timezone.utc).isoformat(),
           "calibration": asdict(fitted)}
    write_json(index_dir / SITE_CALIBRATION, out)
    log.info("site calibration: %s", fitted.fitted_on)
    return {**out, "unread": unread}


def reset_site(index_dir: Path) -> bool:
    """Remove the index's site calibration (back to the build's); False when it had none."""
    path = Path(index_dir) / SITE_CALIBRATION
    if not path.exists():
        return False
    path.unlink()
    return True
