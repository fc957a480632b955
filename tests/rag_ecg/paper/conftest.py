"""Records the paper tests draw: PTB-XL 310 (NU, 100 Hz) and LUDB 1 (mV, 500 Hz)."""
from __future__ import annotations

import pytest

from rag_ecg.data.records import ptbxl_record, read_ludb, read_ptbxl_index


@pytest.fixture(scope="module")
def ptb(ptbxl_dir):
    rows, _ = read_ptbxl_index(ptbxl_dir)
    return ptbxl_record(next(r for r in rows if r.ecg_id == "310"))  # RBBB + anterior MI, sinus rhythm


@pytest.fixture(scope="module")
def ludb(ludb_dir):
    return read_ludb(ludb_dir / "data" / "1")
