"""Where rag-ecg keeps its files: one place so every command agrees on the defaults."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """`RAG_ECG_HOME` if set, else `<checkout>/data` (git-ignored): the SQLite store, renders, runs."""
    return Path(os.environ.get("RAG_ECG_HOME") or PROJECT_ROOT / "data")


def shared_data_dir() -> Path:
    """The real ECG data beside the checkout (`../shared/data`), or `RAG_ECG_SHARED_DATA`."""
    return Path(os.environ.get("RAG_ECG_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


def index_dir() -> Path:
    """Built FAISS indexes live in `<checkout>/index/<name>/` (git-ignored) unless `RAG_ECG_INDEX_DIR`."""
    return Path(os.environ.get("RAG_ECG_INDEX_DIR") or PROJECT_ROOT / "index")
