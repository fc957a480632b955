"""Durability of the encoder run's `last/`: a real SIGKILL inside the save leaves the previous epoch's complete
checkpoint, and the resumed run ends exactly where an uninterrupted one does."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from rag_ecg.encoder.model import ECGEncoder
from training.encoder_checkpoint import STATE_FILE
from training.train_encoder import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "encoder_tiny.yaml"


def _over(db: str, run: Path, epochs: int) -> dict:
    return {"db": db, "run_dir": str(run), "epochs": epochs, "batch_size": 8, "limit_train": 16,
            "limit_val": 8, "final_eval": False, "val_every": 0}


def _epochs_logged(run: Path) -> list[int]:
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in lines if "train_loss" in r]


def _saved(last: Path) -> tuple[int, str]:
    state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
    assert ECGEncoder.load(last, expected_hash=state["weights_sha256"]).checkpoint_hash == state["weights_sha256"]
    return int(state["epoch"]), state["weights_sha256"]


def test_a_kill_inside_the_last_save_resumes_from_the_previous_epoch(ingested_store, tmp_path):
    run = tmp_path / "killed"
    main(TINY, _over(ingested_store.url, run, 1))
    epoch1 = _saved(run / "last")
    assert epoch1[0] == 1

    # epoch 2 in a child killed with SIGKILL inside save_last, after the new weights were written
    code = (f"from training.train_encoder import main; "
            f"main({str(TINY)!r}, {_over(ingested_store.url, run, 2)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAG_ECG_KILL_AT": "encoder-last"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _epochs_logged(run) == [1, 2]  # it did train epoch 2 before dying in the save
    assert _saved(run / "last") == epoch1  # last/ is the complete epoch-1 checkpoint, untouched

    out = main(TINY, _over(ingested_store.url, run, 2))  # resumes epoch 2 from last/
    assert _epochs_logged(run) == [1, 2, 2]
    assert _saved(run / "last")[0] == 2
    assert not [p.name for p in run.glob(".last*")]  # the killed save's temp folder is gone

    # the same two epochs without a kill end on the same weights
    straight = tmp_path / "straight"
    main(TINY, _over(ingested_store.url, straight, 1))
    ref = main(TINY, _over(ingested_store.url, straight, 2))
    assert ECGEncoder.load(out).checkpoint_hash == ECGEncoder.load(ref).checkpoint_hash


def test_a_kill_between_the_renames_resumes_from_the_moved_aside_folder(ingested_store, tmp_path):
    # atomic_dir moves the old last/ to .last.old.PID, then the new one in: a kill between leaves no last/
    run = tmp_path / "run"
    main(TINY, _over(ingested_store.url, run, 1))
    epoch1 = _saved(run / "last")
    shutil.move(run / "last", run / ".last.old.4242")
    main(TINY, _over(ingested_store.url, run, 2))
    assert _epochs_logged(run) == [1, 2]  # resumed, not restarted
    assert _saved(run / "last")[0] == 2 and epoch1[0] == 1
    assert not (run / ".last.old.4242").exists()
