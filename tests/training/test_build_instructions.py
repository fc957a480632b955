"""Instruction data from a real case store: task coverage, answers that match the case's own labels and
signal, evidence that never shows the sample's own case or patient, deterministic output, and JSONL the
fine-tune can read."""
from __future__ import annotations

import json
import re
import sqlite3

import pytest

from training.build_instructions import build, main
from training.instruction_cases import load_cases
from training.instruction_config import FAMILIES, InstructionConfig
from training.instruction_evidence import check_evidence, encoder_retriever, index_retriever

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 16  # cases (lowest ids): the first 16 PTB-XL records hold 13 train (folds 1-8) and 3 val (fold 9)


@pytest.fixture(scope="module")
def store_copy(ingested_store, tmp_path_factory):
    """A private copy of the shared test store in which case B is a repeat recording of case A's patient.

    B gets A's patient id and A's signal, so B's page is A's nearest neighbour by far: if the patient
    filter did not work, B would be the first case cited in A's evidence.
    """
    src = ingested_store.url.split("///", 1)[1]
    dst = tmp_path_factory.mktemp("store") / "cases.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    with sqlite3.connect(dst) as db:
        rows = db.execute("SELECT id, patient_id, signal_path FROM cases WHERE source='ptbxl' AND fold<=8 "
                          "ORDER BY id LIMIT 2").fetchall()
        (a_id, a_patient, a_signal), (b_id, _, _) = rows
        db.execute("UPDATE cases SET patient_id=?, signal_path=? WHERE id=?", (a_patient, a_signal, b_id))
    return f"sqlite:///{dst}", a_id, b_id


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from rag_ecg.encoder.model import ECGEncoder

    d = tmp_path_factory.mktemp("enc") / "encoder"
    ECGEncoder.create("ecg-clip-cpu", seed=0).save(d)
    return d


@pytest.fixture(scope="module")
def built(store_copy, encoder_dir, tmp_path_factory):
    url, _, _ = store_copy
    out = tmp_path_factory.mktemp("instr")
    cfg = InstructionConfig(db_url=url, out_dir=str(out), limit=LIMIT, dpi=40, evidence_share=0.5,
                               encoder_dir=str(encoder_dir), render_presets=["clean"])
    manifest = json.loads(build(cfg).read_text())
    rows = {sp: [json.loads(x) for x in (out / f"{sp}.jsonl").read_text().splitlines()] for sp in ("train", "val")}
    return cfg, out, manifest, rows


def _cases(url):
    from sqlalchemy import select

    from rag_ecg.data.store import Case, ScpStatementRow, open_store, scp_descriptions

    st = open_store(url)
    with st.session() as s:
        cases = {c.id: c for c in s.scalars(select(Case))}
        desc = scp_descriptions(s)
        diagnostic = {r.code for r in s.scalars(select(ScpStatementRow)) if "diagnostic" in (r.kinds or [])}
    st.dispose()
    return cases, desc, diagnostic


def test_coverage_splits_and_manifest(built):
    cfg, out, manifest, rows = built
    assert rows["train"] and rows["val"]
    for sp, want in (("train", set(range(1, 9))), ("val", {9})):
        assert {r["split"] for r in rows[sp]} == {sp}
        assert all(r["source"] == "ptbxl" for r in rows[sp])  # LUDB has no fold: not used
        c = manifest["counts"][sp]
        assert c["samples"] == len(rows[sp]) and set(c["tasks"]) == set(FAMILIES)
        assert sum(c["tasks"].values()) == c["samples"]
        assert c["with_evidence"] == sum(bool(r["evidence_case_ids"]) for r in rows[sp]) > 0
    qtypes = {r["question_type"] for sp in rows for r in rows[sp]}
    assert {"superclass_mc", "rhythm_mc", "form_yesno", "report"} <= qtypes
    assert any(q in qtypes for q in ("rate_value", "rate_category"))
    assert manifest["files"]["train.jsonl"]["samples"] == len(rows["train"])
    assert not manifest["skipped_cases"] and manifest["retriever"].startswith("encoder:")
    # one page per case, shared by its samples, on disk as PNG
    per_case = {}
    for r in rows["train"] + rows["val"]:
        per_case.setdefault(r["case_id"], set()).add(r["image"])
        assert r["conversations"][0]["value"].startswith("<image>\n") and r["conversations"][1]["from"] == "gpt"
    assert all(len(v) == 1 for v in per_case.values())
    imgs = {next(iter(v)) for v in per_case.values()}
    assert len(imgs) == manifest["images"] and all((out / p).is_file() and p.endswith(".png") for p in imgs)


def test_answers_match_the_cases_own_labels(built, store_copy):
    from rag_ecg.paper.header import estimate_heart_rate
    from rag_ecg.data.store import load_case_record

    cfg, out, manifest, rows = built
    cases, desc, diagnostic = _cases(store_copy[0])
    code_of = {v: k for k, v in desc.items()}
    assert len(code_of) == len(desc)  # descriptions name their codes unambiguously
    checked = set()
    for r in rows["train"] + rows["val"]:
        case, qt, ans = cases[r["case_id"]], r["question_type"], r["conversations"][1]["value"]
        assert case.fold in (cfg.train_folds if r["split"] == "train" else cfg.val_folds)
        codes, labels = case.codes, set(case.labels)
        if qt.endswith("_mc"):
            letter = re.match(r"\(([A-H])\) ", ans).group(1)
            assert letter == r["correct_option"] and ans[4:] == r["options"][ord(letter) - 65]
            for i, opt in enumerate(r["options"]):
                present = (r["option_labels"][i] in labels if qt == "superclass_mc" else code_of[opt] in codes)
                assert present == (i == ord(letter) - 65), (r["id"], opt)
            if qt == "scp_mc":  # diagnostic statements are asked only when coded with confidence
                assert codes[code_of[r["options"][ord(letter) - 65]]] >= cfg.min_likelihood
        elif qt in ("superclass_yesno", "scp_yesno", "rhythm_yesno", "form_yesno"):
            truth = r["target"] in (labels if qt == "superclass_yesno" else codes)
            assert truth == r["expected"] and ans.startswith("Yes" if truth else "No")
        elif qt == "superclass_list":
            assert set(re.findall(r"\b(NORM|MI|STTC|CD|HYP)\b", ans)) == labels
        elif qt in ("rate_value", "rate_category"):
            bpm = r["rate_bpm"]
            rec = load_case_record(case)
            assert bpm == round(estimate_heart_rate(rec.signal_mv()[:, rec.leads.index("II")], rec.fs))
            assert f"{bpm} b" in ans
            if "STACH" in codes:
                assert bpm > 100 and "tachycardia" in ans
            if "SBRAD" in codes:
                assert bpm < 60 and "bradycardia" in ans
            if "SR" in codes:
                assert 60 <= bpm <= 100 and "normal" in ans.lower()
        elif qt == "mi_territory":
            assert all(t in codes for t in r["targets"])
        elif qt == "report":
            if r["question_type_detail"] == "original":
                assert ans == case.report.strip()
            else:
                for c, lk in codes.items():
                    if c in desc and c not in cfg.exclude_codes and (c not in diagnostic or lk >= cfg.min_likelihood):
                        assert desc[c] in ans, (r["id"], c)
                for s in labels:
                    assert f"{s} (" in ans
        for c in cfg.exclude_codes:  # amplitude statements are never asked (signals are z-scored)
            assert r.get("target") != c and desc.get(c, "@@") not in r["conversations"][0]["value"].split(
                "</evidence>")[-1]
        checked.add(qt)
    assert len(checked) >= 10


def test_evidence_is_the_prompt_block_and_never_leaks(built, store_copy, encoder_dir):
    from rag_ecg.reader.prompts import format_evidence

    cfg, out, manifest, rows = built
    url, a_id, b_id = store_copy
    from rag_ecg.data.store import open_store

    cases, desc, _ = _cases(url)
    st = open_store(url)
    info = {c.id: c for c in load_cases(st, cfg)[0]}
    st.dispose()
    by_case = {r["case_id"]: r["image"] for sp in rows for r in rows[sp]}
    for cid, c in info.items():
        c.image = by_case[cid]
    retrieve = encoder_retriever(encoder_dir, info, out, cfg, desc)
    with_ev = [r for sp in rows for r in rows[sp] if r["evidence_case_ids"]]
    assert with_ev and any(r["split"] == "val" for r in with_ev)
    for r in with_ev:
        case = cases[r["case_id"]]
        ev = retrieve(info[case.id])
        prompt = r["conversations"][0]["value"]
        head = "<image>\n" + format_evidence(ev) + "\n\n"
        assert prompt.startswith(head) and "<evidence>" not in prompt[len(head):]  # exactly one block, first
        assert r["evidence_case_ids"] == ev.case_ids and len(ev.case_ids) == cfg.evidence_k
        for n in r["evidence_case_ids"]:
            other = cases[n]
            assert n != case.id and other.patient_id != case.patient_id
            assert other.fold in cfg.train_folds  # a val case's labels never appear in any prompt
    # the repeat recording of A's patient (same signal, so the closest page by far) is never A's evidence
    ev_a = retrieve(info[a_id])
    assert b_id not in ev_a.case_ids and a_id not in ev_a.case_ids
    lib = [c for c in info.values() if c.split == "train" and c.id != a_id]
    assert b_id in {c.id for c in lib}
    # english reports with evidence cite only neighbours that share one of the case's classes
    for r in with_ev:
        if r["task"] == "report" and r["question_type_detail"] == "english":
            cited = [int(x) for x in re.findall(r"\[case (\d+)\]", r["conversations"][1]["value"])]
            assert set(cited) <= set(r["evidence_case_ids"])
            assert all(set(cases[c].labels) & set(cases[r["case_id"]].labels) for c in cited)


def test_leaking_or_missing_retriever_is_refused(store_copy, tmp_path):
    url, a_id, b_id = store_copy
    from rag_ecg.search.evidence import Evidence, Neighbour

    def leaky(case):  # returns the same patient's other recording
        other = b_id if case.id == a_id else a_id
        return Evidence(neighbours=[Neighbour(case_id=other, score=0.99, source="ptbxl", external_id="x")])

    cfg = InstructionConfig(db_url=url, out_dir=str(tmp_path / "a"), limit=3, dpi=30, evidence_share=1.0,
                               render_presets=["clean"])
    with pytest.raises(ValueError, match="same patient"):
        build(cfg, retrieve=leaky)
    with pytest.raises(ValueError, match="needs a retriever"):
        main(db_url=url, out_dir=tmp_path / "b", limit=3, dpi=30, evidence_share=0.3)
    with pytest.raises(ValueError, match="unknown InstructionConfig field"):
        InstructionConfig.load(None, evidence_k2=3)


def test_deterministic_and_readable_by_the_finetune(store_copy, built, tmp_path):
    url = store_copy[0]
    cfg, out, manifest, rows = built
    def run(out, seed=0):
        c = InstructionConfig(db_url=url, out_dir=str(out), limit=4, dpi=40, evidence_share=0.0, seed=seed,
                                 render_presets=["clean", "print"])
        return json.loads(build(c).read_text())

    m1 = run(tmp_path / "x")
    pages = {p: p.stat().st_mtime_ns for p in (tmp_path / "x" / "images").iterdir()}
    m2 = run(tmp_path / "x")
    assert m1["files"] == m2["files"] and m1["counts"] == m2["counts"] and not m1["skipped_cases"]
    assert len(pages) == 4 and {p: p.stat().st_mtime_ns for p in pages} == pages  # pages written once
    m3 = run(tmp_path / "z", seed=1)
    assert m3["files"]["train.jsonl"]["sha256"] != m1["files"]["train.jsonl"]["sha256"]

    # the fine-tune tokenizes an evidence sample: answer tokens scored, the evidence block masked
    from training.llm_data import IGNORE_INDEX, ConversationDataset, Example
    from training.tiny_llava import build_processor

    proc = build_processor()
    ds = ConversationDataset(out / "train.jsonl", proc, max_length=4096)
    i = next(i for i, r in enumerate(rows["train"]) if r["evidence_case_ids"])
    ex = ds[i]
    assert isinstance(ex, Example), ex
    scored = ex.labels != IGNORE_INDEX
    assert proc.tokenizer.decode(ex.input_ids[scored]) == " " + rows["train"][i]["conversations"][1]["value"] + "</s>"


def test_index_retrieval_filters_patient_case_and_val(built, store_copy, encoder_dir, tmp_path):
    """Evidence from a real FAISS index over every built page (val cases and B included): what reaches
    the prompt is train cases only, never the case itself or its patient's other recording."""
    import shutil

    from PIL import Image

    from rag_ecg.encoder.model import ECGEncoder
    from rag_ecg.data.store import open_store
    from rag_ecg.search.vector_index import VectorIndex

    cfg, out, manifest, rows = built
    url, a_id, b_id = store_copy
    _, desc, _ = _cases(url)
    st = open_store(url)
    try:
        info = {c.id: c for c in load_cases(st, cfg)[0]}
        pages = {r["case_id"]: r["image"] for sp in rows for r in rows[sp]}
        for cid, c in info.items():
            c.image = pages[cid]
        idx = tmp_path / "index"
        shutil.copytree(encoder_dir, idx / "encoder")
        enc = ECGEncoder.load(idx / "encoder")
        ids = sorted(info)
        emb = enc.embed_images(Image.open(out / info[i].image).convert("RGB") for i in ids)
        images = VectorIndex(enc.embed_dim, encoder_hash=enc.checkpoint_hash)
        images.add(ids, emb)
        images.save(idx / "images.faiss")
        (idx / "manifest.json").write_text(json.dumps({"name": "test", "calibration": {"k": 5, "temperature": 0.05}}))
        retrieve = index_retriever(idx, st, info, out, cfg, desc)
        vals = [c for c in info.values() if c.split == "val"]
        assert vals
        for c in info.values():
            ev = retrieve(c)
            check_evidence(c, ev, info)  # raises on leakage
            assert len(ev.neighbours) == cfg.evidence_k and ev.index_name == "test"
            assert all(info[n].split == "train" and n != c.id for n in ev.case_ids)
            assert set(ev.superclass_scores) == {"NORM", "MI", "STTC", "CD", "HYP"}
        assert b_id not in retrieve(info[a_id]).case_ids
    finally:
        st.dispose()
