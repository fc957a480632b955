"""Shared fixtures: the real data folder, real SQLite/PostgreSQL stores, a small ingested store."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from rag_ecg import paths  # noqa: E402

DEFAULT_TEST_PG = "postgresql+psycopg2://rag_ecg:rag_ecg@127.0.0.1:5432/rag_ecg_test"
N_PTBXL, N_LUDB = 80, 5  # the small store: 80 PTB-XL cases cover all 5 superclasses and folds 1-9


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = paths.shared_data_dir()
    if not (root / "ptbxl" / "ptbxl_database.csv").exists():
        pytest.skip(f"real ECG data not found at {root} (set RAG_ECG_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def ptbxl_dir(shared_data) -> Path:
    return shared_data / "ptbxl"


@pytest.fixture(scope="session")
def ludb_dir(shared_data) -> Path:
    if not (shared_data / "ludb" / "data").is_dir():
        pytest.skip(f"LUDB not found under {shared_data}")
    return shared_data / "ludb"


def _postgres_url() -> str:
    """A fresh database on the test server, or skip (fail when RAG_ECG_REQUIRE_PG=1, as in CI)."""
    from sqlalchemy import create_engine, text

    base = os.environ.get("RAG_ECG_TEST_PG", DEFAULT_TEST_PG)
    try:
        eng = create_engine(base, isolation_level="AUTOCOMMIT")
        name = f"rag_ecg_t_{uuid.uuid4().hex[:10]}"
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
    except Exception as exc:
        msg = f"no PostgreSQL test server at {base} ({type(exc).__name__}); run: bash .ci/postgres.sh"
        if os.environ.get("RAG_ECG_REQUIRE_PG") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """Every store test runs against a real SQLite file and a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cases.db'}"
    return _postgres_url()


@pytest.fixture(scope="session")
def ingested_store(tmp_path_factory, ptbxl_dir, ludb_dir):
    """A real SQLite store with the first 80 PTB-XL cases and 5 LUDB cases (read-only for tests)."""
    from index.ingest import ingest
    from rag_ecg.data.store import open_store

    db = tmp_path_factory.mktemp("store") / "cases.db"
    store = open_store(f"sqlite:///{db}")
    ingest(store, "ptbxl", ptbxl_dir, limit=N_PTBXL, progress=False)
    ingest(store, "ludb", ludb_dir, limit=N_LUDB, progress=False)
    yield store
    store.dispose()


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, ingested_store) -> dict:
    """A tiny random-init encoder and a real index built from the small store's training split."""
    from index.build import BuildConfig, build_index
    from rag_ecg.encoder.model import ECGEncoder

    base = tmp_path_factory.mktemp("tiny_index")
    ECGEncoder.create("ecg-clip-tiny", seed=0).save(base / "encoder")
    build_index(ingested_store, base / "encoder", name="tiny", out_dir=base / "index",
                cfg=BuildConfig(workers=1, page_width=400), progress=False)
    return {"encoder": base / "encoder", "index": base / "index", "db": ingested_store.url}


@pytest.fixture
def scratch_store(tmp_path, ingested_store):
    """A writable copy of the small store (same case ids, so `tiny_index` resolves in it): tests that add
    review jobs write here, never into the shared session store."""
    import sqlite3

    from rag_ecg.data.store import open_store

    src = sqlite3.connect(ingested_store.url.removeprefix("sqlite:///"))
    dst = sqlite3.connect(tmp_path / "scratch.db")
    src.backup(dst)
    dst.close()
    src.close()
    store = open_store(f"sqlite:///{tmp_path / 'scratch.db'}")
    yield store
    store.dispose()


@pytest.fixture
def log_messages():
    """`lines = log_messages("index.ingest")`: the messages that logger emits during the test, whatever
    handlers or propagation `cli.py`'s logging set-up left on it."""
    attached = []

    def collect(name: str) -> list[str]:
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        attached.append((logger, handler))
        return lines

    yield collect
    for logger, handler in attached:
        logger.removeHandler(handler)
