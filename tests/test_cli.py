"""The CLI end to end on a real tiny index: search by image, WFDB record and text; a grounded report."""
from __future__ import annotations

import json
import shutil
import socket

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from rag_ecg.paper.render import render_page
from rag_ecg.data.store import Case, load_case_record

runner = CliRunner()


def _val_case(store) -> Case:
    with store.session() as s:
        return next(c for c in s.scalars(select(Case).order_by(Case.id)) if c.split == "val")


def test_search_by_image_record_and_text(tiny_index, ingested_store, tmp_path):
    case = _val_case(ingested_store)
    png = tmp_path / "query.png"
    render_page(load_case_record(case), preset="photo", seed=3).save(png)
    common = ["--index", str(tiny_index["index"]), "--db", tiny_index["db"], "--k", "4"]
    out = {}
    for name, args in {"image": [str(png)], "record": [case.signal_path + ".hea"],
                       "text": ["--text", "sinusrhythmus normales ekg"]}.items():
        res = runner.invoke(app, ["search", *args, *common, "--format", "json"])
        assert res.exit_code == 0, res.output
        out[name] = json.loads(res.output)
        assert len(out[name]["neighbours"]) == 4
        assert all(n["source"] == "ptbxl" and n["report"] for n in out[name]["neighbours"])
    assert set(out["image"]["superclass_scores"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    table = runner.invoke(app, ["search", str(png), *common])
    assert table.exit_code == 0 and "nearest cases" in table.output and "votes:" in table.output


def test_report_cites_only_retrieved_cases(tiny_index, ingested_store, tmp_path):
    case = _val_case(ingested_store)
    png = tmp_path / "q.png"
    render_page(load_case_record(case), preset="clean", seed=1, dpi=100).save(png)
    res = runner.invoke(app, ["report", str(png), "--index", str(tiny_index["index"]), "--db", tiny_index["db"],
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    from rag_ecg.reader.report import Report

    report = Report.from_dict(rep)
    retrieved = set(report.retrieval.case_ids)
    assert len(retrieved) == 8 and report.cited_case_ids  # the retrieval reader always cites its evidence
    assert set(report.cited_case_ids) <= retrieved
    assert rep["backend"] == "retrieval" and "clinical" in rep["notice"].lower()
    assert rep["measurements"]["sex"] is None  # a picture says nothing of the patient
    common = [str(png), "--index", str(tiny_index["index"]), "--db", tiny_index["db"], "--format", "json"]
    res = runner.invoke(app, ["report", *common, "--sex", "female", "--age", "52"])
    assert res.exit_code == 0 and json.loads(res.output)["measurements"]["sex"] == "F"
    res = runner.invoke(app, ["report", *common, "--sex", "X"])
    assert res.exit_code == 2 and "--sex 'X' is not M or F" in res.output


def test_bad_query_is_one_clear_line(tiny_index, tmp_path):
    bad = tmp_path / "ecg-07.jpg"
    bad.write_text("not an image")
    res = runner.invoke(app, ["search", str(bad), "--index", str(tiny_index["index"]), "--db", tiny_index["db"]])
    assert res.exit_code == 2 and "ecg-07.jpg" in res.output


def _small_ptbxl(src, dst, n_train: int = 40, n_val: int = 4):
    """A PTB-XL-layout folder (what --data accepts) with a few records of folds 1-8 and of fold 9."""
    import csv

    dst.mkdir(parents=True)
    (dst / "records100").symlink_to(src / "records100")
    (dst / "scp_statements.csv").write_bytes((src / "scp_statements.csv").read_bytes())
    with open(src / "ptbxl_database.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    train = [r for r in rows if int(float(r["strat_fold"])) <= 8][:n_train]
    val = [r for r in rows if int(float(r["strat_fold"])) == 9][:n_val]
    with open(dst / "ptbxl_database.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(train + val)


def test_quickstart_then_eval_on_a_user_folder(tiny_index, ptbxl_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_ECG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAG_ECG_INDEX_DIR", str(tmp_path / "indexes"))
    _small_ptbxl(ptbxl_dir, tmp_path / "data" / "ptbxl")
    db = f"sqlite:///{tmp_path / 'qs.db'}"
    args = ["quickstart", "--data", str(tmp_path / "data"), "--encoder", str(tiny_index["encoder"]),
            "--charts", "3", "--db", db]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "review page:" in res.output and "index.html" in res.output
    metrics = json.loads((tmp_path / "home" / "quickstart" / "metrics.json").read_text())
    assert metrics["metrics"]["charts"] == 3 and metrics["metrics"]["citations_valid"] == 1.0
    assert (tmp_path / "indexes" / "default" / "manifest.json").is_file()
    assert "reusing index" in runner.invoke(app, args).output  # a rerun reuses what is done

    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval", "--data", str(tmp_path / "data" / "ptbxl"), "--presets", "clean,scan",
                              "--db", db, "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["set"] == "ptbxl fold 9" and list(ev["presets"]) == ["clean", "scan"]
    assert all(m["charts"] == 4 and m["citations_valid"] == 1.0 for m in ev["presets"].values())
    bad = runner.invoke(app, ["eval", "--data", str(tmp_path / "nowhere"), "--db", db])
    assert bad.exit_code == 2 and "nowhere: no such file or folder" in bad.output


def test_a_corrupt_index_encoder_is_one_line_with_the_artifact_exit_code(tiny_index, tmp_path):
    """The case the restructure was filed for: `search` printed a traceback when an index's encoder is corrupt."""
    index = tmp_path / "index"
    shutil.copytree(tiny_index["index"], index)
    weights = index / "encoder" / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = runner.invoke(app, ["search", "--text", "sinus rhythm", "--index", str(index), "--db", tiny_index["db"]])
    assert res.exit_code == 4, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output


def test_an_unreachable_llm_server_is_one_line_with_the_backend_exit_code(tiny_index, tmp_path):
    png = tmp_path / "q.png"
    render_page(load_case_record(_val_case_of(tiny_index)), preset="clean", seed=1, dpi=100).save(png)
    res = runner.invoke(app, ["report", str(png), "--index", str(tiny_index["index"]), "--db", tiny_index["db"],
                              "--backend", "vllm", "--base-url", f"http://127.0.0.1:{_closed_port()}/v1"])
    assert res.exit_code == 3, res.output
    assert res.output.startswith("error: ") and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("args", [
    ["train-encoder", "--config", "{tmp}/nope.yaml"],
    ["finetune", "--config", "{tmp}/nope.yaml"],
    ["build-instructions", "--config", "{tmp}/nope.yaml"],
    ["eval-encoder", "{tmp}/no-checkpoint"],
    ["convert-pulse", "{tmp}/no-pulse", "{tmp}/out"],
])
def test_every_job_command_reports_bad_input_as_one_line(args, tmp_path):
    res = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code in (2, 4), res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in res.output, res.output
    assert str(tmp_path) in lines[-1]  # the line names the input


def test_verbose_and_quiet_set_the_library_log_level(tmp_path):
    import logging

    runner.invoke(app, ["--quiet", "stats", "--db", f"sqlite:///{tmp_path / 'q.db'}"])
    assert logging.getLogger("rag_ecg").level == logging.WARNING
    runner.invoke(app, ["--verbose", "stats", "--db", f"sqlite:///{tmp_path / 'v.db'}"])
    assert logging.getLogger("rag_ecg").level == logging.DEBUG


def _val_case_of(tiny_index) -> Case:
    from rag_ecg.data.store import open_store

    store = open_store(tiny_index["db"])
    try:
        return _val_case(store)
    finally:
        store.dispose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the commands a user runs first, end to end on tiny data ---------------------------------------------

def test_ingest_then_stats_on_a_fresh_store(ludb_dir, tmp_path):
    from rag_ecg.data.store import open_store, summary

    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    res = runner.invoke(app, ["ingest", "ludb", str(ludb_dir), "--db", db, "--limit", "3"])
    assert res.exit_code == 0, res.output
    assert "ludb: 3 records read, 3 new" in res.output and "0 skipped" in res.output
    store = open_store(db)
    try:
        with store.session() as s:
            cases = list(s.scalars(select(Case).order_by(Case.id)))
        assert [c.source for c in cases] == ["ludb"] * 3 and all(c.signal_path for c in cases)
        s = summary(store)
    finally:
        store.dispose()
    assert s["total"] == 3 and s["by_source"] == {"ludb": 3}
    stats = runner.invoke(app, ["stats", "--db", db])
    assert stats.exit_code == 0, stats.output
    assert "case store: 3 cases" in stats.output
    row = next(line for line in stats.output.splitlines() if "ludb" in line)
    assert row.split("│")[2].strip() == "3"  # the cases column of the ludb row
    again = runner.invoke(app, ["ingest", "ludb", str(ludb_dir), "--db", db, "--limit", "3"])
    assert again.exit_code == 0 and "3 records read, 0 new" in again.output, again.output
    bad = runner.invoke(app, ["ingest", "nosuch", str(ludb_dir), "--db", db])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "nosuch" in bad.output, bad.output


def test_render_writes_a_page_and_its_layout_per_record(ludb_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "pages"
    recs = [str(ludb_dir / "data" / f"{i}.hea") for i in (1, 2)]
    res = runner.invoke(app, ["render", *recs, "--out", str(out), "--layout", "6x2", "--dpi", "60",
                              "--workers", "1", "--preset", "scan", "--image-format", "jpg"])
    assert res.exit_code == 0, res.output
    assert "2 images written" in res.output
    images = sorted(out.glob("*.jpg"))
    assert [p.stem for p in images] == ["1", "2"]
    for p in images:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.width > 500
        layout = json.loads(p.with_suffix(".json").read_text())
        assert layout["layout"] == "6x2"
    bad = runner.invoke(app, ["render", recs[0], "--out", str(out), "--layout", "5x5"])
    assert bad.exit_code == 2 and "5x5" in bad.output, bad.output


def test_build_index_then_search_it(tiny_encoder, ingested_store, tmp_path):
    from rag_ecg.search.retrieve import Retriever

    out = tmp_path / "idx"
    res = runner.invoke(app, ["build-index", "--encoder", str(tiny_encoder), "--db", ingested_store.url,
                              "--split", "val", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"index: {out}" in res.output.splitlines()  # whole, on one line
    with ingested_store.session() as s:
        val = sorted(c.id for c in s.scalars(select(Case)) if c.split == "val")
    retriever = Retriever.open(out, ingested_store)
    assert sorted(int(i) for i in retriever.image_index.ids) == val  # exactly the fold-9 cases
    page = render_page(load_case_record(retriever._cases({val[0]})[val[0]]), preset="clean", seed=0, dpi=100)
    page.save(tmp_path / "p.png")
    found = runner.invoke(app, ["search", str(tmp_path / "p.png"), "--index", str(out), "--db", ingested_store.url,
                                "--k", "2", "--format", "json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["neighbours"][0]["case_id"] == val[0]  # a library page finds itself first


def test_eval_encoder_writes_its_metrics(tiny_encoder, ingested_store, tmp_path):
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["eval-encoder", str(tiny_encoder), "--db", ingested_store.url, "--presets", "clean",
                              "--k", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    with ingested_store.session() as s:
        splits = [c.split for c in s.scalars(select(Case).where(Case.source == "ptbxl"))]
    assert (m["library_size"], m["n_queries"], m["k"]) == (splits.count("train"), splits.count("val"), 3)
    classes = ("NORM", "MI", "STTC", "CD", "HYP")
    assert m["clean/auc"] == pytest.approx(sum(m[f"clean/per_class/{c}/auc"] for c in classes) / 5)  # macro
    for way in ("image_to_report", "report_to_image"):
        assert m[f"clean/{way}/R@1"] <= m[f"clean/{way}/R@5"] <= m[f"clean/{way}/R@10"]
    assert m["clean/loo_library_auc"] > 0.8  # the trained tiny encoder ranks its own library well (chance 0.5)
    assert f"{m['clean/auc']:.3f}" in res.output  # the printed summary shows the same figures
