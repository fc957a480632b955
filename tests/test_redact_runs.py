"""No store password in what a training job writes (issue 15): an encoder run's folder, whose saved config
is read back on resume, and an instruction set built from a config holding a masked URL. The store is a real
PostgreSQL database (tests/pg_store.py); the Ray review's check is tests/rag_ecg/review/test_review_secrets.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_ecg.config import read_yaml
from rag_ecg.errors import ConfigError
from rag_ecg.redact import mask_url
from tests.pg_store import copy_rows, leaks, spelled_out
from training.build_instructions import main as build_instructions
from training.train_encoder import main as train_encoder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "encoder_tiny.yaml"


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_an_encoder_run_keeps_no_password_and_resumes_from_its_own_config(store_url, ingested_store, tmp_path,
                                                                          monkeypatch):
    """The run folder (config.yaml, metrics, checkpoints) holds the store URL masked; a resume from that
    config.yaml takes the real URL from RAG_ECG_DB, and without it (or with another store there) stops with
    one line saying what to pass."""
    copy_rows(ingested_store.url, store_url)
    url, needles = spelled_out(store_url)
    monkeypatch.delenv("RAG_ECG_DB", raising=False)
    run = tmp_path / "run"
    over = {"db": url, "run_dir": str(run), "epochs": 1, "batch_size": 8, "limit_train": 16, "limit_val": 8,
            "final_eval": False}
    train_encoder(TINY, over)
    assert leaks(needles, run) == []
    first = len((run / "metrics.jsonl").read_text().splitlines())
    saved = run / "config.yaml"
    assert read_yaml(saved)["db"] == mask_url(url) != url
    with pytest.raises(ConfigError, match=r"^db: postgresql\+psycopg2://\w+:\*\*\*@[^ ]+ was saved with its "
                                          r"password hidden; pass the real URL with --db .* or set RAG_ECG_DB "
                                          r"to it$"):
        train_encoder(saved, {"epochs": 2})
    monkeypatch.setenv("RAG_ECG_DB", f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(ConfigError, match=r"\(RAG_ECG_DB names another store: sqlite:///"):
        train_encoder(saved, {"epochs": 2})
    monkeypatch.setenv("RAG_ECG_DB", url)
    train_encoder(saved, {"epochs": 2})  # resumed from run/last: epoch 2 follows epoch 1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[first:]]
    assert {r["epoch"] for r in lines if "epoch" in r} == {2}
    assert leaks(needles, run) == []


def test_instructions_from_a_config_with_a_masked_store_url_say_what_to_pass(tmp_path, monkeypatch):
    """A config copied from a manifest holds the URL masked: one line naming the flag, not a login failure."""
    cfg = tmp_path / "instructions.yaml"
    cfg.write_text(f"db_url: postgresql+psycopg2://ecg:***@127.0.0.1:1/cases\nout_dir: {tmp_path / 'out'}\n")
    monkeypatch.delenv("RAG_ECG_DB", raising=False)
    with pytest.raises(ConfigError, match=r"^db_url: .* pass the real URL with --db-url"):
        build_instructions(cfg)
