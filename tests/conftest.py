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
        msg = f"real ECG data not found at {root} (set RAG_ECG_SHARED_DATA)"
        if os.environ.get("RAG_ECG_REQUIRE_DATA") == "1":  # CI: fail, never skip, without the data
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def ptbxl_dir(shared_data) -> Path:
    return shared_data / "ptbxl"


@pytest.fixture(scope="session")
def ludb_dir(shared_data) -> Path:
    if not (shared_data / "ludb" / "data").is_dir():
        msg = f"LUDB not found under {shared_data}"
        if os.environ.get("RAG_ECG_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
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


def train_tiny_encoder(store, out: Path, steps: int = 60) -> Path:
    """The tiny encoder (`ecg-clip-tiny`) after `steps` quick steps of the encoder recipe's objective (CLIP
    loss + superclass head, weighted 5: it is what generalises from 68 cases) on clean pages of the store's
    training cases (~10 s; one torch thread, so that the weights do not depend on the machine's thread count).

    Untrained, every page embeds within ~1e-6 cosine of every other: scores say nothing and neighbour order
    is float noise. Trained like this, library cases spread over cosines from ~0 to ~0.99 and a held-out
    chart's neighbours share its labels well above chance (tests/rag_ecg/search/test_retrieve.py)."""
    import numpy as np
    import torch
    from sqlalchemy import select

    from rag_ecg.data.labels import SUPERCLASSES
    from rag_ecg.data.store import Case, load_case_record, scp_descriptions
    from rag_ecg.encoder.model import ECGEncoder
    from rag_ecg.encoder.text import case_text
    from rag_ecg.paper.render import render_page
    from training.encoder_objective import Objective, TrainModule

    with store.session() as s:
        cases = [c for c in s.scalars(select(Case).order_by(Case.id)) if c.split == "train"]
        descriptions = scp_descriptions(s)
    enc = ECGEncoder.create("ecg-clip-tiny", seed=0, aux_classes=SUPERCLASSES)
    pages = [render_page(load_case_record(c), preset="clean", seed=0, dpi=100) for c in cases]
    pixels = torch.as_tensor(np.stack([enc.preprocess.pixels(p, strict=False) for p in pages]))
    tokens = enc.tokenizer([case_text(c.report, c.codes or {}, descriptions) for c in cases])
    y = torch.tensor([[lab in (c.labels or []) for lab in SUPERCLASSES] for c in cases], dtype=torch.float32)
    module, objective = TrainModule(enc), Objective(aux_weight=5.0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(0)
    module.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randperm(len(cases), generator=order)[:32]
            loss, _ = objective(*module(enc.model_input(pixels[batch]), tokens[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    enc.model.eval()
    enc.mark_modified()
    return enc.save(out, training={"steps": steps, "cases": len(cases), "purpose": "test fixture"})


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, ingested_store) -> Path:
    """The tiny encoder briefly trained on the small store's training split (`train_tiny_encoder`); read-only."""
    return train_tiny_encoder(ingested_store, tmp_path_factory.mktemp("tiny_encoder") / "encoder")


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, ingested_store, tiny_encoder) -> dict:
    """A real index of the small store's training split, built with the briefly trained tiny encoder."""
    from index.build import BuildConfig, build_index

    base = tmp_path_factory.mktemp("tiny_index")
    build_index(ingested_store, tiny_encoder, name="tiny", out_dir=base / "index",
                cfg=BuildConfig(workers=1, page_width=400), progress=False)
    return {"encoder": tiny_encoder, "index": base / "index", "db": ingested_store.url}


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
    handlers, propagation or level `cli.py`'s logging set-up left on it."""
    attached = []

    def collect(name: str) -> list[str]:
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        attached.append((logger, handler, logger.level))
        logger.setLevel(logging.DEBUG)  # every message, whatever level the root was left at
        return lines

    yield collect
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)
