"""The `source=` search filter (Retriever and `cli search --source`) on a real index of PTB-XL and LUDB cases."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from index.build import BuildConfig, build_index
from rag_ecg.data.records import read_wfdb
from rag_ecg.paper.render import render_page
from rag_ecg.search.retrieve import Retriever


@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory, ingested_store, tiny_encoder):
    """PTB-XL fold 9 (val) cases and the store's LUDB cases (which have no split) in one small index."""
    out = tmp_path_factory.mktemp("mixed") / "index"
    build_index(ingested_store, tiny_encoder, name="mixed", out_dir=out,
                cfg=BuildConfig(splits=["val"], include_unsplit=True, workers=1, page_width=0), progress=False)
    return out


def test_source_filter_keeps_only_that_source(mixed_index, ingested_store, ludb_dir):
    retriever = Retriever.open(mixed_index, ingested_store)
    indexed = retriever._cases({int(i) for i in retriever.image_index.ids})
    counts = {src: sum(c.source == src for c in indexed.values()) for src in ("ptbxl", "ludb")}
    assert counts["ptbxl"] >= 3 and counts["ludb"] >= 3, counts
    # filtered, a query gets every case of that source and no other, ranked as in the unfiltered list
    page = render_page(read_wfdb(ludb_dir / "data" / "2"), preset="clean", seed=0, dpi=100)
    k = len(indexed)
    every = retriever.search_images([page], k=k)[0]
    assert {n.source for n in every.neighbours} == {"ptbxl", "ludb"}
    for src in ("ludb", "ptbxl"):
        got = retriever.search_images([page], k=k, source=src)[0]
        assert {n.source for n in got.neighbours} == {src}
        assert len(got.neighbours) == counts[src]  # all of that source, not just those in the unfiltered top k
        # same cases, same order as the unfiltered ranking restricted to the source
        assert [n.case_id for n in got.neighbours] == [n.case_id for n in every.neighbours if n.source == src]
    text = retriever.search_texts(["sinus rhythm"], k=3, source="ludb")[0]
    assert len(text.neighbours) == 3 and {n.source for n in text.neighbours} == {"ludb"}
    assert retriever.search_images([page], k=3, source="nowhere")[0].neighbours == []


def test_cli_search_source_option(mixed_index, ingested_store):
    runner = CliRunner()
    common = ["--index", str(mixed_index), "--db", ingested_store.url, "--k", "3", "--format", "json"]
    for src in ("ludb", "ptbxl"):
        res = runner.invoke(app, ["search", "--text", "sinus rhythm", *common, "--source", src])
        assert res.exit_code == 0, res.output
        neighbours = json.loads(res.output)["neighbours"]
        assert len(neighbours) == 3 and {n["source"] for n in neighbours} == {src}
