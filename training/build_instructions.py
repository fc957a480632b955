"""Instruction data for the LLM fine-tune: case store + rendered pages -> LLaVA-format JSONL (train / val).

Why: PULSE learned to read ECG images from ECGInstruct's four task families; rag-ecg also needs the model
to use retrieved cases as evidence. Every answer here comes from the case's own coded labels (or its own
signal, for the rate), never from a model, so it can be checked. A configurable share of samples shows the
retrieved-case evidence block exactly as `rag_ecg.reader.prompts.format_evidence` builds it at inference.

Task families (ECGInstruct's four):
  classification - multiple choice / yes-no / list on PTB-XL superclasses and diagnostic SCP statements
  rhythm         - rhythm statement (multiple choice, yes-no) and ventricular rate from the R-R intervals
  morphology     - form statements (ST-T, Q waves, ...) and the infarct territory
  report         - an English report composed from the SCP statements; or the original (mostly German) one

Honest choices (see the report of issue 7):
- Splits follow PTB-XL's folds (train 1-8, val 9); cases without a fold (LUDB) are not used.
- Evidence neighbours never share the sample's patient (nor are the case itself) and always come from the
  train split, so no label of a val case or of the same patient reaches a prompt. They come from a real
  retriever: a built index (`index_dir`), a trained encoder (`encoder_dir`: nearest pages by cosine), or a
  given `retrieve(case) -> Evidence`. Without one, evidence samples are refused: random or label-matched
  "neighbours" would teach the model to trust evidence that retrieval cannot deliver.
- Amplitude statements (LVOLT, HVOLT, VCLVH) are left out: the shared PTB-XL signals are z-scored per lead,
  so their pages cannot show absolute voltage. Diagnostic statements coded below `min_likelihood` are
  neither asked as present nor used as absent distractors.

Layout of `out_dir`: train.jsonl, val.jsonl, images/<case>-<preset>-<dpi>dpi-s<seed>.png (one per case,
shared by all its samples), manifest.json (counts per split/task/question type, evidence, skipped cases).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (`python training/build_instructions.py`): the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_ecg.data.store import open_store, scp_descriptions
from rag_ecg.errors import ConfigError
from rag_ecg.io import atomic_write, versions
from rag_ecg.reader.prompts import format_evidence
from rag_ecg.redact import redact
from training.common import real_url
from training.instruction_cases import load_cases, render_pages
from training.instruction_config import FAMILIES, InstructionConfig
from training.instruction_evidence import (Retrieve, check_evidence, citation_sentence, encoder_retriever,
                                           index_retriever)
from training.instruction_tasks import Generator

log = logging.getLogger(__name__)


def build(cfg: InstructionConfig, retrieve: Retrieve | None = None) -> Path:
    """Write the instruction set described by `cfg`; returns the manifest path."""
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    store = open_store(real_url(cfg.db_url, "db_url", "--db-url (cli.py build-instructions: --db)"))
    try:
        cases, vocab = load_cases(store, cfg)
        with store.session() as s:
            descriptions = scp_descriptions(s)
        log.info(f"{len(cases)} cases ({sum(c.split == 'train' for c in cases)} train, "
                 f"{sum(c.split == 'val' for c in cases)} val)")
        errors = render_pages(cases, out, cfg)
        ok = [c for c in cases if c.id not in errors]
        by_id = {c.id: c for c in ok}
        retriever_kind = "given" if retrieve is not None else None
        if cfg.evidence_share > 0 and retrieve is None:
            if cfg.index_dir:
                retrieve, retriever_kind = index_retriever(cfg.index_dir, store, by_id, out, cfg, descriptions), \
                    f"index:{cfg.index_dir}"
            elif cfg.encoder_dir:
                retrieve, retriever_kind = encoder_retriever(cfg.encoder_dir, by_id, out, cfg, descriptions), \
                    f"encoder:{cfg.encoder_dir}"
            else:
                raise ConfigError(f"evidence_share={cfg.evidence_share} needs a retriever: give index_dir (a built "
                                 "index) or encoder_dir (a trained encoder), or set evidence_share 0")

        gen = Generator(vocab, cfg)
        samples: dict[str, list[dict]] = {"train": [], "val": []}
        counts: dict = {sp: {"cases": 0, "samples": 0, "with_evidence": 0, "tasks": {}, "question_types": {}}
                        for sp in samples}
        unanswerable: dict[str, int] = {}
        for c in ok:
            counts[c.split]["cases"] += 1
            evidence = None
            for family in FAMILIES:
                for j in range(int(cfg.samples_per_family.get(family, 0))):
                    rng = random.Random(f"{cfg.seed}:{c.id}:{family}:{j}")
                    made = gen.make(family, c, rng)
                    if made is None:
                        unanswerable[family] = unanswerable.get(family, 0) + 1
                        continue
                    question, answer, meta = made
                    prompt, ev_ids = question, []
                    if retrieve is not None and rng.random() < cfg.evidence_share:
                        if evidence is None:
                            evidence = retrieve(c)
                            check_evidence(c, evidence, by_id)
                        prompt = format_evidence(evidence) + "\n\n" + question
                        ev_ids = [int(n.case_id) for n in evidence.neighbours]
                        if family == "report" and meta.get("question_type_detail") == "english":
                            answer = answer + " " + citation_sentence(c, evidence)
                    samples[c.split].append({
                        "id": f"{c.id}-{family}-{j}", "image": c.image,
                        "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                          {"from": "gpt", "value": answer}],
                        "task": family, "case_id": c.id, "source": c.source, "external_id": c.external_id,
                        "patient_id": c.patient_id, "split": c.split, "evidence_case_ids": ev_ids, **meta})
                    cs = counts[c.split]
                    cs["samples"] += 1
                    cs["with_evidence"] += bool(ev_ids)
                    cs["tasks"][family] = cs["tasks"].get(family, 0) + 1
                    cs["question_types"][meta["question_type"]] = cs["question_types"].get(meta["question_type"], 0) + 1
        files = {}
        for split, rows in samples.items():
            path = out / f"{split}.jsonl"
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
            atomic_write(path, data)
            files[f"{split}.jsonl"] = {"samples": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "config": redact(dataclasses.asdict(cfg)), "files": files, "counts": counts,
            "unanswerable_by_family": unanswerable, "retriever": retriever_kind,
            "skipped_cases": {str(k): v for k, v in errors.items()},
            "images": len({c.image for c in ok}), "versions": versions(),
        }
        mpath = out / "manifest.json"
        atomic_write(mpath, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
        log.info(f"train {counts['train']['samples']} / val {counts['val']['samples']} samples -> {out}")
        return mpath
    finally:
        store.dispose()


def main(config_path: Path | None = None, db_url: str | None = None, out_dir: Path | None = None,
         index_dir: Path | None = None, encoder_dir: Path | None = None, limit: int | None = None,
         seed: int | None = None, evidence_share: float | None = None, dpi: int | None = None,
         workers: int | None = None, retrieve: Retrieve | None = None) -> Path:
    """Entry point for `cli.py build-instructions`; returns the manifest path (beside train/val.jsonl)."""
    cfg = InstructionConfig.load(config_path, db_url=db_url, out_dir=str(out_dir) if out_dir else None,
                                 index_dir=str(index_dir) if index_dir else None,
                                 encoder_dir=str(encoder_dir) if encoder_dir else None, limit=limit,
                                 seed=seed, evidence_share=evidence_share, dpi=dpi, workers=workers)
    return build(cfg, retrieve=retrieve)


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Build LLaVA-format instruction data from the case store.")
    ap.add_argument("--config", type=Path, help="YAML with InstructionConfig fields")
    ap.add_argument("--db-url", help="case store URL (default: RAG_ECG_DB or data/rag_ecg.db)")
    ap.add_argument("--out-dir", type=Path, help="output folder (default data/instructions)")
    ap.add_argument("--index-dir", type=Path, help="built index used to retrieve evidence")
    ap.add_argument("--encoder-dir", type=Path, help="trained encoder used to retrieve evidence (no index)")
    ap.add_argument("--limit", type=int, help="at most this many cases")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--evidence-share", type=float, help="share of samples with evidence (0 = none)")
    ap.add_argument("--dpi", type=int)
    ap.add_argument("--workers", type=int)
    a = ap.parse_args(argv)
    return main(a.config, a.db_url, a.out_dir, a.index_dir, a.encoder_dir, a.limit, a.seed, a.evidence_share,
                a.dpi, a.workers)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_cli(sys.argv[1:]))
