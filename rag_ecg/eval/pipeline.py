"""End-to-end evaluation: a labelled set -> charts under each render preset -> the review pipeline -> metrics.

This measures what a user gets (load -> encode -> retrieve -> reader -> report), not the encoder alone:
each preset is a resumable review job over the same charts, and the reports it stored are scored against
the records' own labels, ECGBench-style (PTB-XL superclasses: macro AUC from scores; macro AUC, F1 and
Hamming loss from the report's binarised statements; AUC and F1 average over the classes the set holds), plus
report label F1 (SCP statements asserted vs the record's) and citation validity: the share of the case ids the reader cited that were retrieved, counted
before the citation check dropped the statements citing unknown cases (and how many it dropped). An answer
that held no report (review status `unparsed`) is scored as a report that asserts nothing.

`--data` is any folder laid out like PTB-XL (`ptbxl_database.csv`), like LUDB (WFDB records whose header
comments hold the diagnoses, mapped to superclasses by `records.ludb_superclasses`), or a CSV of labelled
images (`path` + `labels` columns, optional `codes`) for real scanned or photographed tracings.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.records import RecordError, find_wfdb_records, read_ludb, read_ptbxl_index
from rag_ecg.data.store import ScpStatementRow
from rag_ecg.errors import InputError
from rag_ecg.eval.bootstrap import (LEVEL, RESAMPLES, SEED, hamming_stat, intervals, macro_auc_stat, macro_f1_stat,
                                    mean_stat, ratio_stat)
from rag_ecg.eval.calibration_error import expected_calibration_error
from rag_ecg.eval.metrics import hamming_loss, labels_to_matrix, macro_auc, macro_f1, per_class_f1
from rag_ecg.io import atomic_open, atomic_write
from rag_ecg.redact import redact
from rag_ecg.review.outputs import iter_rows
from rag_ecg.review.run import index_info, resolve_index_dir, review

logger = logging.getLogger(__name__)

PTBXL_SPLITS = {"train": list(range(1, 9)), "val": [9], "test": [10]}
AS_IS = "as-is"  # the "preset" of a set of real images: they are read, never re-drawn
_CODE_IN_TEXT = re.compile(r"\(([A-Z0-9_()]+?)\)")


class EvalError(InputError):
    """The labelled set cannot be read or selected; the message names the input."""


@dataclass
class LabelledChart:
    """One chart of the evaluation set with its ground truth."""

    path: str  # WFDB record as `<record>.hea`, or an image file: the review CSV's `path` value (its key)
    record_id: str
    labels: list[str]  # PTB-XL superclasses
    codes: dict[str, float] = field(default_factory=dict)  # SCP-ECG statements (empty where unknown)


@dataclass
class LabelledSet:
    kind: str  # ptbxl | ludb | images
    name: str  # what the tables call it, e.g. "ptbxl fold 9"
    charts: list[LabelledChart]
    skipped: list[str] = field(default_factory=list)  # one line per record that could not be read

    @property
    def has_codes(self) -> bool:
        return any(c.codes for c in self.charts)


# ---------------------------------------------------------------------------------------------- the sets


def parse_folds(split: str | None) -> list[int] | None:
    """`val` | `test` | `train` | `all` | `9` | `9,10` | `fold=9` -> PTB-XL folds (None: all); default val."""
    text = (split or "val").strip().lower().removeprefix("fold=").removeprefix("folds=")
    if text == "all":
        return None
    if text in PTBXL_SPLITS:
        return PTBXL_SPLITS[text]
    try:
        folds = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise EvalError(f"split {split!r}: use val, test, train, all or fold numbers like 9 or 9,10") from None
    if not folds or any(not 1 <= f <= 10 for f in folds):
        raise EvalError(f"split {split!r}: PTB-XL folds are 1-10")
    return folds


def load_labelled(data: str | Path, split: str | None = None, limit: int | None = None) -> LabelledSet:
    """The labelled charts of `data` (PTB-XL folder, LUDB-like folder of WFDB records, or labelled-image CSV)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise EvalError(f"{root}: no such file or folder")
    root = root.resolve()
    if root.is_file() and root.suffix.lower() == ".csv":
        out = _images_set(root)
    elif (root / "ptbxl_database.csv").is_file():
        out = _ptbxl_set(root, split)
    elif root.is_dir() and (root / "labels.csv").is_file():
        out = _images_set(root / "labels.csv")
    elif root.is_dir() and any(root.rglob("*.hea")):
        out = _ludb_set(root)
    else:
        raise EvalError(f"{root}: not a PTB-XL folder (ptbxl_database.csv), a folder of WFDB records with "
                        f"diagnoses (LUDB layout) or a CSV/labels.csv of labelled images")
    if limit:
        out.charts = out.charts[:limit]
    if not out.charts:
        raise EvalError(f"{root}: no labelled charts in {out.name}")
    return out


def _ptbxl_set(root: Path, split: str | None) -> LabelledSet:
    rows, _ = read_ptbxl_index(root)
    folds = parse_folds(split)
    chosen = [r for r in rows if folds is None or r.fold in folds]
    charts, skipped = [], []
    for r in chosen:
        hea = Path(str(r.record_path) + ".hea")
        if not hea.is_file():
            skipped.append(f"{hea}: record header missing")
            continue
        charts.append(LabelledChart(str(hea), f"ptbxl:{r.ecg_id}", list(r.labels), dict(r.codes)))
    name = "ptbxl " + ("all folds" if folds is None else f"fold {','.join(map(str, folds))}")
    return LabelledSet("ptbxl", name, charts, skipped)


def _ludb_set(root: Path) -> LabelledSet:
    charts, skipped = [], []
    for p in find_wfdb_records(root):
        try:
            rec = read_ludb(p)
        except (RecordError, OSError, ValueError) as exc:
            skipped.append(" ".join(str(exc).split()))
            continue
        if not rec.extra.get("diagnoses"):
            skipped.append(f"{p}: no diagnoses in the header comments")
            continue
        charts.append(LabelledChart(str(p) + ".hea", rec.record_id, list(rec.labels)))
    return LabelledSet("ludb", root.name, charts, skipped)


def _split_labels(text: str) -> list[str]:
    return [t for t in re.split(r"[\s,;|]+", (text or "").strip().upper()) if t]


def _images_set(path: Path) -> LabelledSet:
    """A CSV with `path` (image files, relative to the CSV) and `labels` (superclasses, e.g. `MI STTC`)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalError(f"{path}: unreadable CSV ({exc})") from None
    if not rows or "path" not in rows[0] or not ({"labels", "superclass"} & set(rows[0])):
        raise EvalError(f"{path}: a labelled-image CSV needs 'path' and 'labels' (or 'superclass') columns")
    charts, skipped = [], []
    for i, row in enumerate(rows, start=2):
        p = Path((row.get("path") or "").strip()).expanduser()
        p = p if p.is_absolute() else path.parent / p
        labels = _split_labels(row.get("labels") or row.get("superclass") or "")
        unknown = [x for x in labels if x not in SUPERCLASSES]
        if not p.is_file():
            skipped.append(f"{path}:{i}: {p} not found")
        elif unknown:
            skipped.append(f"{path}:{i}: unknown label(s) {' '.join(unknown)} (use {' '.join(SUPERCLASSES)})")
        else:
            codes = {c: 100.0 for c in _split_labels(row.get("codes") or "")}
            charts.append(LabelledChart(str(p.resolve()), p.name, labels, codes))
    return LabelledSet("images", path.parent.name or str(path), charts, skipped)


# ---------------------------------------------------------------------------------------------- scoring


def report_superclasses(report: dict, code_superclass: dict[str, str | None]) -> set[str]:
    """Superclasses a stored report asserts: its superclass diagnoses and those of its SCP-code diagnoses."""
    out = set()
    for d in report.get("diagnoses") or []:
        sup = d.get("superclass") or code_superclass.get((d.get("code") or "").upper())
        if sup in SUPERCLASSES:
            out.add(sup)
    return out


def report_codes(report: dict, known: set[str]) -> set[str]:
    """SCP-ECG statements a stored report asserts: diagnosis codes, and codes named in rhythm/findings."""
    out = {str(d["code"]).upper() for d in report.get("diagnoses") or [] if d.get("code")}
    if any(d.get("superclass") == "NORM" and not d.get("code") for d in report.get("diagnoses") or []):
        out.add("NORM")  # PTB-XL's NORM is a statement and a superclass; readers state it once
    for part in [report.get("rhythm")] + list(report.get("findings") or []):
        for m in _CODE_IN_TEXT.findall((part or {}).get("text") or ""):
            if m in known:
                out.add(m)
    return out & known if known else out


def sample_f1_scores(truth: Sequence[set], pred: Sequence[set]) -> np.ndarray:
    """Per report, the F1 between asserted and true label sets (1 when both are empty)."""
    return np.array([1.0 if not t and not p else 2 * len(t & p) / (len(t) + len(p))
                     for t, p in zip(truth, pred, strict=True)], dtype=np.float64)


def sample_f1(truth: Sequence[set], pred: Sequence[set]) -> float:
    """Mean over reports of the F1 between asserted and true label sets (1 when both are empty)."""
    scores = sample_f1_scores(truth, pred)
    return float(scores.mean()) if scores.size else float("nan")


def cited_ids(report: dict) -> list[int]:
    """Every case id the reader cited, before the citation check: the kept statements' and the dropped ones'."""
    parts = [report.get("rhythm"), report.get("impression")] + list(report.get("findings") or []) \
        + list(report.get("diagnoses") or [])
    kept = [int(c) for p in parts for c in (p or {}).get("cited") or []]
    return kept + [int(c) for d in report.get("dropped_citations") or [] for c in d.get("cited") or []]


def score_reports(reports: Sequence[dict], truth: Sequence[LabelledChart],
                  code_superclass: dict[str, str | None]) -> dict:
    """ECGBench-style metrics of stored reports against their charts' labels (all in [0, 1])."""
    y = labels_to_matrix([c.labels for c in truth])
    scores, preds, asserted, cited_n, cited_good = [], [], [], [], []
    dropped = 0
    for rep in reports:
        sup = report_superclasses(rep, code_superclass)
        conf = {d.get("superclass"): float(d.get("confidence") or 0.0) for d in rep.get("diagnoses") or []
                if d.get("superclass")}
        votes = (rep.get("retrieval") or {}).get("superclass_scores") or {}
        scores.append([float(votes.get(c, conf.get(c, 0.0))) for c in SUPERCLASSES])
        preds.append([c in sup for c in SUPERCLASSES])
        asserted.append(sup)
        retrieved = {int(c["case_id"]) for c in (rep.get("retrieval") or {}).get("cases") or []}
        ids = cited_ids(rep)
        cited_n.append(len(ids))
        cited_good.append(sum(i in retrieved for i in ids))
        dropped += len(rep.get("dropped_citations") or [])
    s, p = np.array(scores, dtype=np.float64), np.array(preds, dtype=np.uint8)
    cited_total, cited_ok = sum(cited_n), sum(cited_good)
    report_f1 = sample_f1_scores([set(c.labels) for c in truth], asserted)
    stats = {"macro_auc_scores": macro_auc_stat(y, s), "macro_auc_binary": macro_auc_stat(y, p),
             "macro_f1": macro_f1_stat(y, p), "hamming_loss": hamming_stat(y, p),
             "superclass_report_f1": mean_stat(report_f1), "citations_valid": ratio_stat(cited_good, cited_n)}
    out = {
        "charts": len(truth),
        "macro_auc_scores": macro_auc(y, s), "macro_auc_binary": macro_auc(y, p),
        "macro_f1": macro_f1(y, p), "hamming_loss": hamming_loss(y, p),
        "superclass_report_f1": float(report_f1.mean()),
        "calibration_error": expected_calibration_error(y, s),  # ECE of the stated probabilities (10 bins)
        "citations": cited_total,  # case ids cited, before the check dropped any
        "citations_valid": cited_ok / cited_total if cited_total else 1.0,
        "citations_unknown": cited_total - cited_ok,  # cited ids the retrieval did not return
        "statements_dropped": dropped,  # statements the citation check removed for citing them
        "per_class_f1": dict(zip(SUPERCLASSES, map(float, per_class_f1(y, p)), strict=True)),
        "prevalence": dict(zip(SUPERCLASSES, map(float, y.mean(0)), strict=True)),
    }
    if any(c.codes for c in truth):
        known = set(code_superclass) | {k for c in truth for k in c.codes}
        scp = sample_f1_scores([set(c.codes) for c in truth], [report_codes(r, known) for r in reports])
        out["scp_report_f1"] = float(scp.mean())
        stats["scp_report_f1"] = mean_stat(scp)
    # percentile bootstrap over charts: {value, lo, hi} per figure (the table prints "0.842 [0.81–0.87]")
    out["ci95"] = intervals(stats, len(truth))
    out["bootstrap"] = {"resamples": RESAMPLES, "seed": SEED, "level": LEVEL, "unit": "chart"}
    return out


# ---------------------------------------------------------------------------------------------- running


def _write_chart_csv(path: Path, charts: Sequence[LabelledChart]) -> None:
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "record_id", "labels"])
        for c in charts:
            w.writerow([c.path, c.record_id, " ".join(c.labels)])


def _code_superclasses(store) -> dict[str, str | None]:
    """Every SCP statement the store knows -> its diagnostic superclass (None for rhythm/form statements)."""
    with store.session() as s:
        return {r.code: r.diagnostic_class for r in s.scalars(select(ScpStatementRow))}


@dataclass
class EvalConfig:
    """One end-to-end evaluation (saved in eval.json)."""

    presets: list[str] = field(default_factory=lambda: ["clean", "scan", "photo"])  # how WFDB records are drawn
    backend: str = "retrieval"  # the reader, as in `review`
    backend_options: dict = field(default_factory=lambda: {"threshold": None})  # None: per-label thresholds of the index
    k: int = 8  # neighbours per chart
    workers: int = 2  # chart loading processes
    device: str = "cpu"  # encoder device


def run_eval(labelled: LabelledSet, out_dir: str | Path, store, index_dir: str | Path,
             cfg: EvalConfig | None = None, progress: bool = True) -> dict:
    """Review the set once per preset (resumable jobs under out_dir/<preset>/) and score every job."""
    cfg = cfg or EvalConfig()
    out = Path(out_dir).expanduser().resolve()
    idx = resolve_index_dir(index_dir)
    info = index_info(idx)
    presets = [AS_IS] if labelled.kind == "images" else list(cfg.presets)
    chart_csv = out / "charts.csv"
    _write_chart_csv(chart_csv, labelled.charts)
    by_path = {c.path: c for c in labelled.charts}
    code_sup = _code_superclasses(store)
    result = {"set": labelled.name, "kind": labelled.kind, "charts": len(labelled.charts),
              "skipped": labelled.skipped, "index": str(idx), "encoder_hash": info.get("encoder_hash"),
              "config": redact(asdict(cfg)), "presets": {}}  # eval.json is shared: no secrets
    for preset in presets:
        logger.info("%s: reviewing %d charts drawn '%s'", labelled.name, len(labelled.charts), preset)
        summary = review(chart_csv, out / preset, store=store, index_dir=idx, backend=cfg.backend, k=cfg.k,
                         workers=cfg.workers, progress=progress, backend_options=cfg.backend_options,
                         preset="clean" if preset == AS_IS else preset, device=cfg.device)
        reports, truth, errors, unparsed = [], [], [], 0
        for row in iter_rows(store, summary.job_id):
            chart = by_path.get(row["chart"])
            if chart is None:
                continue
            if row["status"] in ("done", "unparsed") and row["report"]:
                reports.append(row["report"])  # an unparsed answer asserts nothing: scored, not left out
                truth.append(chart)
                unparsed += row["status"] == "unparsed"
            elif row["status"] == "error":
                errors.append(row["error"])
        metrics = score_reports(reports, truth, code_sup) if reports else {"charts": 0}
        metrics.update({"errors": len(errors), "error_examples": errors[:5], "unparsed": unparsed,
                        "pending": summary.pending,
                        "review_html": summary.outputs.get("html"),
                        "charts_per_s": summary.charts_per_s})
        result["presets"][preset] = metrics
    atomic_write(out / "eval.json", json.dumps(result, indent=2, default=str))
    atomic_write(out / "eval.md", markdown(result))
    return result


TABLE_COLUMNS = (("macro_auc_scores", "AUC (scores)"), ("macro_auc_binary", "AUC (binary)"), ("macro_f1", "F1"),
                 ("hamming_loss", "Hamming loss"), ("superclass_report_f1", "report F1 (superclass)"),
                 ("scp_report_f1", "report F1 (SCP)"), ("calibration_error", "ECE"),
                 ("citations_valid", "citations valid"))


def table_rows(result: dict) -> list[list[str]]:
    """One row per preset: preset, charts, then TABLE_COLUMNS with their 95 % intervals (see `figure`)."""
    rows = []
    for preset, m in result["presets"].items():
        notes = [f"{m[k]} {name}" for k, name in (("errors", "err"), ("unparsed", "unparsed"),
                                                  ("statements_dropped", "dropped")) if m.get(k)]
        cells = [preset, f"{m.get('charts', 0)}" + (f" ({', '.join(notes)})" if notes else "")]
        cells += [figure(m, key) for key, _ in TABLE_COLUMNS]
        rows.append(cells)
    return rows


def figure(metrics: dict, key: str) -> str:
    """`0.842 [0.81–0.87]`: a figure with its bootstrap 95 % interval (— where the metric does not apply)."""
    v = metrics.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    ci = (metrics.get("ci95") or {}).get(key) or {}
    if ci.get("lo") is None or ci.get("hi") is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{ci['lo']:.2f}–{ci['hi']:.2f}]"


def markdown(result: dict) -> str:
    """The result as a Markdown table (what the README quotes)."""
    head = ["preset", "charts"] + [name for _, name in TABLE_COLUMNS]
    lines = [f"### {result['set']} — {result['kind']}, index `{Path(result['index']).name}`, "
             f"encoder {str(result.get('encoder_hash') or '')[:12]}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    if result.get("skipped"):
        lines += ["", f"{len(result['skipped'])} record(s) skipped, e.g. {result['skipped'][0]}"]
    boot = next((m["bootstrap"] for m in result["presets"].values() if m.get("bootstrap")), None)
    if boot:
        lines += ["", f"[brackets]: {100 * boot['level']:.0f} % percentile-bootstrap interval over charts "
                      f"({boot['resamples']} resamples, seed {boot['seed']})"]
    prev = next(iter(result["presets"].values()), {}).get("prevalence")
    if prev:
        lines += ["", "prevalence: " + ", ".join(f"{k} {v:.2f}" for k, v in prev.items())]
        absent = [k for k, v in prev.items() if not v]
        if absent:
            lines += [f"no chart carries {', '.join(absent)}: AUC and F1 average over the other classes"]
    return "\n".join(lines) + "\n"
