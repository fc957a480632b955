"""What the review page shows beyond a chart's own row: full-size pictures and trace overlays, each neighbour's
findings in English with its (repaired) report, the truth where the input carries labels, stored verdicts.

Why files and not data URLs: a page of 2,000 charts would be hundreds of MB; the pictures are JPEGs under
`thumbs/` in the job folder, linked relatively, so the folder stays self-contained (no network, movable).
The loader writes a chart's full-size picture and its overlay while it has the page open; a chart reviewed
before that (or an overlay that could not be drawn) gets its full-size picture here, its overlay never (that
would read every picture again).
"""
from __future__ import annotations

import csv
from pathlib import Path

from sqlalchemy import select

from rag_ecg.data.images import load_image
from rag_ecg.data.labels import SUPERCLASSES, english_statements
from rag_ecg.data.store import Case, ScpStatementRow, Store, load_case_record
from rag_ecg.data.text_repair import repair_report
from rag_ecg.paper.render import render_page
from rag_ecg.review.config import FULL_WIDTH, THUMBS
from rag_ecg.review.inputs import chart_kind
from rag_ecg.review.jobs import case_meta, job_verdicts, write_thumb
from rag_ecg.review.loader import jpeg_bytes, open_chart


def attach_page_data(store: Store, out_dir: Path, rows: list[dict], job_info: dict) -> None:
    """Set on each shown row `full`, `overlay`, `truth`, `predicted`, `verdict`, and on each neighbour
    `full`, `report`, `statements` (code, English, likelihood)."""
    thumbs = out_dir / THUMBS
    review = (job_info.get("settings") or {}).get("review", {})
    preset, dpi = review.get("preset", "clean"), int(review.get("dpi") or 100)
    for row in rows:
        full, over = f"chart-{row['id']}-full.jpg", f"chart-{row['id']}-overlay.jpg"
        if not (thumbs / full).exists() and row.get("thumb"):  # reviewed before full-size pictures were kept
            meta = case_meta(store, [row["chart"]]).get(row["chart"], {})
            try:
                page = open_chart(chart_kind(row["chart"]), row["path"], meta, preset, dpi, row["chart"])
                write_thumb(out_dir, full, jpeg_bytes(page, FULL_WIDTH, 85, optimize=False))
            except Exception:  # the file moved since: the thumbnail is all the page has
                pass
        row["full"] = f"{THUMBS}/{full}" if (thumbs / full).exists() else row.get("thumb")
        row["overlay"] = f"{THUMBS}/{over}" if (thumbs / over).exists() else None
    _attach_neighbours(store, out_dir, rows, dpi)
    _attach_truth(store, rows, job_info.get("input") or "")
    verdicts = job_verdicts(store, int(job_info["id"]))
    for row in rows:
        row["verdict"] = verdicts.get(int(row["id"]))


def _attach_neighbours(store: Store, out_dir: Path, rows: list[dict], dpi: int) -> None:
    thumbs = out_dir / THUMBS
    ids = sorted({int(n["case_id"]) for row in rows for n in row.get("neighbours") or []})
    cases: dict[int, Case] = {}
    with store.session() as s:
        for lo in range(0, len(ids), 500):
            cases.update({c.id: c for c in s.scalars(select(Case).where(Case.id.in_(ids[lo:lo + 500])))})
        descriptions = dict(s.execute(select(ScpStatementRow.code, ScpStatementRow.description)).all())
    made: set[int] = set()
    for row in rows:
        for n in row.get("neighbours") or []:
            cid = int(n["case_id"])
            name = f"case-{cid}-full.jpg"
            if cid not in made and not (thumbs / name).exists():
                made.add(cid)
                _write_case_page(out_dir, name, n.get("image_path"), cases.get(cid), dpi)
            n["full"] = f"{THUMBS}/{name}" if (thumbs / name).exists() else n.get("thumb")
            case = cases.get(cid)
            n["report"] = repair_report(case.report) if case is not None else ""
            n["statements"] = english_statements(dict(case.codes or {}), descriptions) if case is not None else []


def _write_case_page(out_dir: Path, name: str, page_path: str | None, case: Case | None, dpi: int) -> None:
    """A neighbour's full-size page: the index's kept page (copied), else drawn from the store."""
    try:
        if page_path and Path(page_path).exists():
            img = load_image(page_path)
            data = Path(page_path).read_bytes() if img.width <= FULL_WIDTH and page_path.endswith(".jpg") \
                else jpeg_bytes(img, FULL_WIDTH, 85)
        elif case is not None:
            data = jpeg_bytes(render_page(load_case_record(case), preset="clean", seed=0, dpi=dpi), FULL_WIDTH, 85,
                              optimize=False)
        else:
            return
        write_thumb(out_dir, name, data)
    except Exception:  # an unreadable reference page: the thumbnail stands in
        return


def _attach_truth(store: Store, rows: list[dict], descriptor: str) -> None:
    """`truth`: the chart's labelled superclasses (a CSV input's `labels` column, a store case's labels) or
    None; `predicted`: the superclasses its report asserts (superclass or SCP-code diagnoses)."""
    truth: dict[str, list[str]] = {}
    if descriptor.startswith("csv:"):
        truth = _csv_labels(Path(descriptor[4:]))
    case_ids = [int(r["chart"][5:]) for r in rows if r["chart"].startswith("case:") and r["chart"][5:].isdigit()]
    with store.session() as s:
        code_class = dict(s.execute(select(ScpStatementRow.code, ScpStatementRow.diagnostic_class)).all())
        for lo in range(0, len(case_ids), 500):
            for cid, labels in s.execute(select(Case.id, Case.labels).where(Case.id.in_(case_ids[lo:lo + 500]))):
                truth[f"case:{cid}"] = list(labels or [])
    for row in rows:
        row["truth"] = truth.get(row["chart"])
        pred = {d.get("superclass") or code_class.get(str(d.get("code") or "").upper())
                for d in row.get("diagnoses") or []}
        row["predicted"] = [c for c in SUPERCLASSES if c in pred]


def _csv_labels(path: Path) -> dict[str, list[str]]:
    """chart key -> superclasses of a review input CSV with a `labels` column (an `eval` set's charts.csv);
    keys as the review made them (a WFDB record's `path` without `.hea` gets it)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            if "labels" not in reader.fieldnames or "path" not in reader.fieldnames:
                return {}
            rows = [((r.get("path") or "").strip(), r.get("labels") or "") for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    out = {}
    for p, labels in rows:
        found = [x for x in labels.replace(",", " ").replace(";", " ").upper().split() if x in SUPERCLASSES]
        out[p] = found
        if not p.lower().endswith(".hea"):
            out[p + ".hea"] = found
    return out
