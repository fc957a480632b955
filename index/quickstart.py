"""The one-command demo: ingest -> encoder (train or reuse) -> index -> fold-9 `photo` charts reviewed and scored.

Every step reuses what an earlier run finished (ingest is idempotent, a trained encoder and a finished index
are kept under the data folder, the review job resumes), so re-running costs little.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from index.build import build_index
from index.ingest import ingest
from rag_ecg import paths
from rag_ecg.data.store import Store
from rag_ecg.encoder.checkpoint import EncoderLoadError
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.encoder.shipped import default_encoder
from rag_ecg.eval.pipeline import EvalConfig, load_labelled, run_eval
from rag_ecg.io import atomic_write
from training.train_encoder import main as train_encoder

log = logging.getLogger(__name__)


def ensure_encoder(store: Store, encoder: Path | None, minutes: float, retrain: bool = False) -> Path:
    """A given checkpoint; else the encoder shipped in the package; with `retrain` (or when this install has
    none) the quickstart's own, trained once with the CPU recipe (time-capped)."""
    if encoder:
        return Path(encoder)
    if not retrain:
        try:
            return default_encoder()
        except EncoderLoadError as e:
            log.warning("%s; training one instead", e)
    run_dir = paths.data_dir() / "runs" / "encoder-quickstart"
    final = run_dir / "encoder"  # the recipe writes its finished checkpoint here (an interrupted run resumes)
    if (final / "manifest.json").exists():
        ECGEncoder.load(final)
        log.info("reusing encoder %s", final)
        return final
    log.info("training the CPU encoder for up to %g minutes (training/configs/encoder_cpu.yaml)", minutes)
    return Path(train_encoder(paths.PROJECT_ROOT / "training/configs/encoder_cpu.yaml",
                              {"run_dir": str(run_dir), "max_minutes": minutes, "db": store.url,
                               "final_eval": False}))


def ensure_index(store: Store, encoder: Path, name: str) -> Path:
    """The index `name` when it was built with this encoder, else a fresh build."""
    folder = paths.index_dir() / name
    manifest = folder / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("encoder_hash") == \
            ECGEncoder.load(encoder).checkpoint_hash:
        log.info("reusing index %s", folder)
        return folder
    return build_index(store, encoder, name=name)


def run(store: Store, data: Path, encoder: Path | None = None, minutes: float = 8.0, charts: int = 60,
        index_name: str = "default", retrain: bool = False) -> dict:
    """Every step in turn (each reusing what an earlier run finished); returns the summary it writes."""
    found = [(n, data / n) for n in ("ptbxl", "ludb") if (data / n).is_dir()]
    if not found:
        raise FileNotFoundError(f"{data}: no ptbxl/ or ludb/ folder (pass --data)")
    for name, folder in found:
        res = ingest(store, name, folder)
        log.info("%s: %d new, %d updated, %d skipped", name, res.inserted, res.updated, len(res.skipped))
    enc = ensure_encoder(store, encoder, minutes, retrain)
    index = ensure_index(store, enc, index_name)
    if not (data / "ptbxl").is_dir():
        raise FileNotFoundError(f"{data}: the quickstart reviews PTB-XL fold-9 records: no ptbxl/ folder")
    out = paths.data_dir() / "quickstart"
    # fold 9 is never in the index (it holds the training split only): these are unseen patients
    labelled = load_labelled(data / "ptbxl", "val", limit=charts)
    result = run_eval(labelled, out, store, index, EvalConfig(presets=["photo"], workers=min(2, os.cpu_count() or 1)))
    metrics = result["presets"]["photo"]
    summary = {"encoder": str(enc), "index": str(index), "review_html": metrics.get("review_html"),
               "metrics": metrics, "eval_json": str(out / "eval.json")}
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    return summary
