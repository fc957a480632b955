"""An index is bound to the case store it was built from by (source, external_id), not by row id alone.

Real stores (SQLite and PostgreSQL) whose row ids point at other ECGs than the ones indexed must be refused
by every way an index is opened (Retriever, review, the CLI) with one line naming the index and the store.
"""
from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import inspect, select
from typer.testing import CliRunner

from cli import app
from index.ingest import ingest
from rag_ecg.data.store import Case, open_store
from rag_ecg.errors import ArtifactError
from rag_ecg.review.run import review
from rag_ecg.search.retrieve import Retriever


def _shuffled(url: str, ptbxl_dir, ludb_dir):
    """The same records as the small store, ingested in another order: row ids now name other ECGs."""
    store = open_store(url)
    ingest(store, "ludb", ludb_dir, limit=5, progress=False)
    ingest(store, "ptbxl", ptbxl_dir, limit=20, progress=False)
    return store


@pytest.fixture
def shuffled_store(store_url, ptbxl_dir, ludb_dir):
    store = _shuffled(store_url, ptbxl_dir, ludb_dir)
    yield store
    store.dispose()


def test_an_index_refuses_a_store_whose_ids_name_other_ecgs(tiny_index, shuffled_store, ingested_store, tmp_path):
    index = tiny_index["index"]
    with ingested_store.session() as s:
        there = {c.id: f"{c.source}:{c.external_id}" for c in s.scalars(select(Case))}
    with shuffled_store.session() as s:
        here = {c.id: f"{c.source}:{c.external_id}" for c in s.scalars(select(Case))}
    with pytest.raises(ArtifactError) as err:
        Retriever.open(index, shuffled_store)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{index}: built from another case store")
    assert repr(shuffled_store) in msg and "python cli.py build-index" in msg and "--db" in msg
    cid = int(msg.split("(case ", 1)[1].split(" ", 1)[0])
    assert f"case {cid} is {there[cid]} there, {here.get(cid, 'missing')} here" in msg

    # review refuses before it creates a job in the store
    charts = tmp_path / "charts"
    charts.mkdir()
    with pytest.raises(ArtifactError, match="built from another case store"):
        review(charts, tmp_path / "out", store=shuffled_store, index_dir=index, progress=False)
    with shuffled_store.engine.connect() as c:
        if inspect(c).has_table("review_jobs"):
            assert c.exec_driver_sql("select count(*) from review_jobs").scalar() == 0


def test_the_cli_refuses_the_wrong_db_in_one_line(tiny_index, ptbxl_dir, ludb_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    _shuffled(url, ptbxl_dir, ludb_dir).dispose()
    res = CliRunner().invoke(app, ["search", "--text", "sinus rhythm", "--index", str(tiny_index["index"]),
                                   "--db", url])
    assert res.exit_code == 4, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert "built from another case store" in res.output


def test_the_store_it_was_built_from_opens_and_a_copy_of_it_too(tiny_index, scratch_store):
    r = Retriever.open(tiny_index["index"], scratch_store)  # same cases, same ids, another file
    assert r.image_index.ntotal == r.manifest["cases"]["count"]


def test_a_tampered_case_list_is_refused(tiny_index, ingested_store, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index["index"], index)
    doc = json.loads((index / "cases.json").read_text())
    doc["external_ids"][0] = "999999"
    (index / "cases.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="cases.json"):
        Retriever.open(index, ingested_store)


def test_an_index_from_before_the_binding_opens_with_a_warning(tiny_index, ingested_store, tmp_path, log_messages):
    index = tmp_path / "index"
    shutil.copytree(tiny_index["index"], index)
    m = json.loads((index / "manifest.json").read_text())
    del m["cases"]
    (index / "manifest.json").write_text(json.dumps(m))
    (index / "cases.json").unlink()
    lines = log_messages("rag_ecg.search.index_folder")
    r = Retriever.open(index, ingested_store)
    assert r.image_index.ntotal > 0
    assert any(str(index) in line and "rebuild" in line and "python cli.py build-index" in line for line in lines)
