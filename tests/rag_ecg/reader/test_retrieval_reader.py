"""The no-LLM reader on evidence from real PTB-XL cases: votes -> diagnoses, rhythm, citations, abstention."""
from __future__ import annotations

import json

import pytest

from rag_ecg.errors import BackendError
from rag_ecg.reader.backends import backend_from_config, get_backend
from rag_ecg.reader.interpret import interpret, report_command
from rag_ecg.reader.retrieval import RetrievalBackend
from rag_ecg.data.records import read_ptbxl_index
from tests.openai_server import ptbxl_evidence

NORMAL_IDS = ("24", "43", "55", "85", "103", "195")  # four normal ECGs in sinus rhythm, then LAFB/IMI and RBBB


def test_majority_labels_become_cited_diagnoses(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir, NORMAL_IDS)
    r = interpret(None, ev, get_backend("retrieval"))
    assert r.parsed and r.backend == "retrieval" and r.model == "similarity-vote"
    sup = [d for d in r.diagnoses if d.code is None]
    assert [d.superclass for d in sup] == ["NORM"]
    assert sup[0].confidence == pytest.approx(ev.superclass_scores["NORM"], abs=1e-4)
    assert sup[0].cited == [1000, 1001, 1002, 1003]  # exactly the neighbours labelled NORM
    assert [d.code for d in r.diagnoses if d.code] == []  # the NORM code (0.70) is the NORM superclass: once
    assert r.rhythm.text.startswith("sinus rhythm (SR)") and r.rhythm.cited == [1000, 1001, 1002, 1003, 1005]
    assert (r.rate_bpm, r.axis, r.intervals.pr_ms, r.intervals.qrs_ms, r.intervals.qt_ms) == (None,) * 5
    assert r.impression.cited == [1000, 1001, 1002]
    assert '\u201csinusrhythmus normales ekg\u201d' in r.impression.text
    assert not r.dropped_citations and set(r.cited_case_ids) <= set(ev.case_ids)
    assert r.retrieval.k == 6 and r.retrieval.index_name == "test-index" and r.retrieval.encoder_hash == "0123abcd"


def test_abstains_when_no_label_reaches_the_threshold(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir)  # NORM 0.49, CD 0.36, MI 0.19: the cases disagree
    r = RetrievalBackend().compose(ev)
    assert r.diagnoses == []
    assert any("Abstaining" in f.text and f.cited == [] for f in r.findings)
    assert r.rhythm is not None and "SR" in r.rhythm.text  # rhythm still agrees (4 of 6, vote 0.67)
    lower = RetrievalBackend(threshold=0.3).compose(ev)
    assert [d.superclass for d in lower.diagnoses if d.code is None] == ["NORM", "CD"]
    cd = next(d for d in lower.diagnoses if d.superclass == "CD" and d.code is None)
    assert cd.cited == [1000, 1002]  # PTB-XL 103 (LAFB) and 195 (CRBBB)


def test_code_diagnoses_get_superclass_from_statements_and_form_codes_become_findings(ptbxl_dir):
    _, statements = read_ptbxl_index(ptbxl_dir)
    ev = ptbxl_evidence(ptbxl_dir, ("103", "103", "195"), votes=False)  # fallback votes from neighbours
    r = RetrievalBackend(statements=statements).compose(ev)
    codes = {d.code: d for d in r.diagnoses if d.code}
    assert codes["LAFB"].superclass == "CD" and codes["LAFB"].label == "left anterior fascicular block"
    assert codes["IMI"].superclass == "MI" and codes["IMI"].cited == [1000, 1001]
    assert any(f.text.startswith("abnormal QRS (ABQRS) in 2 of 3") for f in r.findings)
    assert r.rhythm.text.startswith("sinus tachycardia (STACH)")


def test_threshold_none_uses_the_index_thresholds(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir)
    ev.thresholds = {"NORM": 0.4, "CD": 0.9}
    r = RetrievalBackend(threshold=None).compose(ev)
    assert [d.superclass for d in r.diagnoses if d.code is None] == ["NORM"]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="within"):
        RetrievalBackend(threshold=1.5)
    with pytest.raises(BackendError, match="no language model"):
        RetrievalBackend().generate([], [])
    with pytest.raises(BackendError, match="unknown backend 'gpt'"):
        get_backend("gpt")
    with pytest.raises(BackendError, match="needs model_path"):
        get_backend("hf")


def test_report_command_renders_every_format(ptbxl_dir, tmp_path):
    from PIL import Image

    ev = ptbxl_evidence(ptbxl_dir, NORMAL_IDS)
    img = tmp_path / "query.png"
    Image.new("RGB", (300, 200), "white").save(img)
    text = report_command(img, ev, backend="retrieval", fmt="text")
    assert "Rhythm: sinus rhythm (SR)" in text and "normal ECG (NORM): confidence 0.70" in text
    js = json.loads(report_command(img, ev, fmt="json"))
    assert js["diagnoses"][0]["superclass"] == "NORM" and js["notice"].startswith("Not for clinical use")
    page = report_command(img, ev, fmt="html", out=tmp_path / "r.html")
    assert page.count("data:image/png;base64,") == 1 and (tmp_path / "r.html").read_text() == page
    with pytest.raises(ValueError, match="--format 'xml'"):
        report_command(img, ev, fmt="xml")


def test_backend_from_yaml_config(tmp_path, ptbxl_dir):
    cfg = tmp_path / "reader.yaml"
    cfg.write_text("backend: retrieval\noptions:\n  threshold: 0.3\n  impression_cases: 1\n")
    be = backend_from_config(cfg)
    r = be.compose(ptbxl_evidence(ptbxl_dir))
    assert [d.superclass for d in r.diagnoses if d.code is None] == ["NORM", "CD"] and r.impression.cited == [1000]
    cfg.write_text("backend: vllm\noptions:\n  base_url: http://127.0.0.1:9/v1\n  temprature: 0\n")
    with pytest.raises(BackendError, match=r"reader.yaml: unknown option\(s\) temprature for backend 'vllm'"):
        backend_from_config(cfg)


def test_citations_of_near_tied_neighbours_do_not_depend_on_their_order_or_float_noise(ptbxl_dir):
    """Scores equal to 1e-5 (what other torch thread settings leave of a tie) cite in case-id order, and the
    report does not change with the order the neighbours arrive in."""
    ev = ptbxl_evidence(ptbxl_dir, NORMAL_IDS)
    for n, noise in zip(ev.neighbours, (3e-7, -2e-7, 1e-7, 0.0, -3e-7, 2e-7)):
        n.score = 0.9 + noise  # all six tied at 1e-5
    forward = RetrievalBackend().compose(ev)
    ev.neighbours.reverse()
    for n, noise in zip(ev.neighbours, (-1e-7, 2e-7, 3e-7, -3e-7, 0.0, 1e-7)):
        n.score = 0.9 + noise  # the same tie, other noise
    backward = RetrievalBackend().compose(ev)
    composed = lambda r: {k: v for k, v in r.to_dict().items() if k != "retrieval"}  # noqa: E731 (evidence as given)
    assert composed(forward) == composed(backward)
    norm = next(d for d in forward.diagnoses if d.superclass == "NORM" and d.code is None)
    assert norm.cited == [1000, 1001, 1002, 1003]
    assert forward.impression.cited == [1000, 1001, 1002]  # the most similar: the tie cut by case id


def test_similarity_scale_is_quoted_and_a_weak_best_match_is_flagged_out_of_library(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir, NORMAL_IDS)
    for n, pct in zip(ev.neighbours, (55.0, 40.0, 30.0, 20.0, 10.0, 5.0)):
        n.similarity_pct = pct
    r = interpret(None, ev, get_backend("retrieval"))
    assert "closer than 55 % of best matches" in r.impression.text and not r.notes
    assert r.retrieval.cases[0].similarity_pct == 55.0
    for n in ev.neighbours:
        n.similarity_pct = 1.0  # weaker than 98 % of held-out pictures' best matches
    far = interpret(None, ev, get_backend("retrieval"))
    assert any(note.startswith("Out of library") for note in far.notes)
    assert [d.superclass for d in far.diagnoses] == [d.superclass for d in r.diagnoses]  # a note, not a refusal
