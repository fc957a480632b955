"""Case store on a real SQLite file and a real PostgreSQL database (same tests, both URLs)."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from index.ingest import ingest
from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
from rag_ecg.data.store import Case, load_case_record, open_store
from rag_ecg.errors import BackendError, InputError


def test_load_case_record_round_trip(store_url, ptbxl_dir, ludb_dir):
    store = open_store(store_url)
    ingest(store, "ptbxl", ptbxl_dir, limit=3, progress=False)
    ingest(store, "ludb", ludb_dir, limit=1, progress=False)
    rows, _ = read_ptbxl_index(ptbxl_dir)
    with store.session() as s:
        cases = s.scalars(select(Case).order_by(Case.id)).all()
    direct = ptbxl_record(rows[0])
    back = load_case_record(cases[0])
    assert np.array_equal(back.signal, direct.signal) and back.labels == direct.labels
    ludb = load_case_record(cases[-1])
    assert ludb.units == "mV" and ludb.fs == 500 and ludb.labels == cases[-1].labels
    store.dispose()


def test_unreachable_database_is_one_clear_line():
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:1/x: cannot open case store") as exc:
        open_store("postgresql+psycopg2://u:secret@127.0.0.1:1/x")
    assert isinstance(exc.value, RuntimeError) and "secret" not in str(exc.value)
    for bad in ("notaurl", "foo://x/y"):  # a URL that cannot work is bad input, not a failing server
        with pytest.raises(InputError, match=f"{bad}: cannot open case store"):
            open_store(bad)
