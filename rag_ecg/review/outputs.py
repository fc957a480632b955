"""A job's outputs, regenerated from the store after every run: results.csv, results.jsonl, index.html + thumbs/,
manifest.json (so they are complete after a resume, and written atomically so a reader never sees half a file).

Each row carries the tracing's measurements (`MEASURE_COLUMNS`, null where not measured, `measure_error` says
why) and the rule-based findings from them, apart from the neighbours' votes; `stemi_urgent` flags a chart
whose ST elevation meets the STEMI criteria.
"""
from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import select

from rag_ecg.data.images import load_image
from rag_ecg.data.store import Case, ReviewItem, ReviewJob, Store, load_case_record
from rag_ecg.io import atomic_open, atomic_write, versions, write_json
from rag_ecg.paper.render import render_page
from rag_ecg.redact import redact
from rag_ecg.review import html as review_html
from rag_ecg.review.config import STAGES, STATUSES, THUMBS, ReviewConfig
from rag_ecg.review.inputs import chart_kind
from rag_ecg.review.jobs import case_meta, write_thumb
from rag_ecg.review.loader import jpeg_bytes, open_chart
from rag_ecg.review.page_data import attach_page_data

MEASURE_COLUMNS = ("heart_rate_bpm", "rr_irregular", "qrs_axis_deg", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
                   "qtc_fridericia_ms", "stemi_criteria")
CSV_COLUMNS = ("chart", "path", "status", "error", "stemi_urgent", *MEASURE_COLUMNS, "measured_findings",
               "measure_error", "top_diagnosis", "top_confidence", "diagnoses", "impression", "cited_cases",
               "dropped_citations", "raw_answer", "neighbours", "attempts", "t_load_s", "t_embed_s", "t_search_s",
               "t_report_s", "t_total_s")
RAW_EXCERPT = 2000  # characters of an unparsed answer the CSV / page show (results.jsonl's report has it all)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula
_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def item_row(item: ReviewItem) -> dict:
    """One chart as the outputs show it (plain JSON types)."""
    rep = item.report or {}
    diags = sorted(({"label": d.get("label"), "code": d.get("code"), "superclass": d.get("superclass"),
                     "confidence": float(d.get("confidence") or 0.0), "cited": list(d.get("cited") or []),
                     "basis": d.get("basis") or "votes"}
                    for d in rep.get("diagnoses") or []),
                   key=lambda d: (d["basis"] != "measured", -d["confidence"]))  # a measured STEMI leads
    impression = (rep.get("impression") or {}).get("text") if rep else None
    cited: dict[int, None] = {}
    for part in ([rep.get("rhythm")] + list(rep.get("findings") or []) + list(rep.get("diagnoses") or [])
                 + [rep.get("impression")]):
        for c in (part or {}).get("cited") or []:
            cited.setdefault(int(c), None)
    dropped = [{"where": d.get("where"), "text": d.get("text"), "unknown": [int(c) for c in d.get("unknown") or []]}
               for d in rep.get("dropped_citations") or []]
    raw = rep.get("raw_text") if rep and not rep.get("parsed", True) else None
    timings = {k: float(v) for k, v in (item.timings or {}).items()}
    timings["total"] = round(sum(timings.get(s, 0.0) for s in STAGES), 6)
    top = diags[0] if diags else None
    m = rep.get("measurements") or {}
    found = list(rep.get("measured_findings") or [])
    return {
        "id": item.id, "chart": item.chart_key, "path": item.path, "status": item.status, "error": item.error,
        "attempts": item.attempts, **{k: m.get(k) for k in MEASURE_COLUMNS}, "st_mv": m.get("st_mv"),
        "st_j_mv": m.get("st_j_mv"),
        "stemi_urgent": bool(m.get("stemi_criteria")), "measured_findings": [f.get("text") for f in found],
        "measure_error": m.get("error") if m else None, "diagnoses": diags,
        "top_diagnosis": _diag_name(top) if top else None, "top_confidence": top["confidence"] if top else None,
        "impression": impression, "rhythm": (rep.get("rhythm") or {}).get("text") if rep else None,
        "findings": [f.get("text") for f in rep.get("findings") or []], "cited_cases": list(cited),
        "dropped_citations": dropped, "raw_answer": raw[:RAW_EXCERPT] if raw is not None else None,
        "neighbours": list(item.neighbours or []), "timings": timings, "report": item.report,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
    }


def _diag_name(d: dict) -> str:
    return d.get("superclass") if d.get("code") is None and d.get("superclass") else (d.get("code") or d["label"])


def csv_cell(value):
    """A cell a spreadsheet shows as text: one starting like a formula (= + - @ tab CR) gets a leading ' — except a
    plain number (an axis of -30°: a spreadsheet reads it as the number it is, no formula)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(row: dict) -> dict:
    """One results.csv line (cells neutralised against formula injection; results.jsonl keeps raw text)."""
    t = row["timings"]
    cells = {
        "chart": row["chart"], "path": row["path"], "status": row["status"], "error": row["error"] or "",
        "stemi_urgent": "URGENT" if row["stemi_urgent"] else "",
        **{k: _measure_cell(row[k]) for k in MEASURE_COLUMNS},
        "measured_findings": "; ".join(row["measured_findings"]), "measure_error": row["measure_error"] or "",
        "top_diagnosis": row["top_diagnosis"] or "",
        "top_confidence": "" if row["top_confidence"] is None else f"{row['top_confidence']:.4f}",
        "diagnoses": "; ".join(f"{_diag_name(d)} {d['confidence']:.2f}" for d in row["diagnoses"]),
        "impression": row["impression"] or "", "cited_cases": " ".join(map(str, row["cited_cases"])),
        "dropped_citations": "; ".join(f"{d['where']}: {' '.join(map(str, d['unknown']))}"
                                       for d in row["dropped_citations"]),
        "raw_answer": row["raw_answer"] or "",
        "neighbours": " ".join(f"{n['case_id']}:{n['score']:.3f}" for n in row["neighbours"]),
        "attempts": row["attempts"],
        **{f"t_{s}_s": f"{t[s]:.4f}" if s in t else "" for s in STAGES}, "t_total_s": f"{t['total']:.4f}",
    }
    return {k: csv_cell(v) for k, v in cells.items()}


def _measure_cell(v) -> str:
    """A measurement as a CSV cell: empty when not measured, leads joined by spaces, booleans as true/false."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def iter_rows(store: Store, job_id: int, page: int = 500) -> Iterator[dict]:
    last = 0
    while True:
        with store.session() as s:
            items = list(s.scalars(select(ReviewItem).where(ReviewItem.job_id == job_id, ReviewItem.id > last)
                                   .order_by(ReviewItem.id).limit(page)))
        if not items:
            return
        last = items[-1].id
        for it in items:
            yield item_row(it)


def write_outputs(store: Store, job_id: int, out_dir: Path, cfg: ReviewConfig,
                  index_dir: Path | None = None) -> dict[str, Path]:
    """results.csv, results.jsonl, index.html (+ thumbs) and manifest.json, all from the store."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with store.session() as s:
        job = s.get(ReviewJob, job_id)
        job_info = {"id": job.id, "key": job.key, "input": job.input, "status": job.status,
                    "settings": redact(job.settings or {}),  # also jobs recorded before secrets were masked
                    "created_at": job.created_at.isoformat() if job.created_at else None}
    summary = {"by_status": dict.fromkeys(STATUSES, 0), "by_superclass": {}, "confidence": [], "total": 0,
               "urgent": []}
    shown: list[dict] = []
    csv_path, jsonl_path = out_dir / "results.csv", out_dir / "results.jsonl"
    # both files replace their old versions only once both are complete (an error removes both temp files)
    with atomic_open(csv_path, "w") as fc, atomic_open(jsonl_path, "w") as fj:
        writer = csv.DictWriter(fc, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in iter_rows(store, job_id):
            writer.writerow(csv_row(row))
            fj.write(json.dumps({k: v for k, v in row.items() if k != "id"}, default=str) + "\n")
            summary["total"] += 1
            summary["by_status"][row["status"]] = summary["by_status"].get(row["status"], 0) + 1
            if row["stemi_urgent"]:
                summary["urgent"].append(row["chart"])
            if row["status"] == "done":
                for sup in sorted({d["superclass"] for d in row["diagnoses"] if d["superclass"]}):
                    summary["by_superclass"][sup] = summary["by_superclass"].get(sup, 0) + 1
                if row["top_confidence"] is not None:
                    summary["confidence"].append(row["top_confidence"])
            if len(shown) < cfg.html_rows:
                shown.append(row)
    _attach_thumbs(store, out_dir, shown, cfg, job_info)
    attach_page_data(store, out_dir, shown, job_info)  # full size, overlays, neighbours' findings, truth, verdicts
    html_path = out_dir / "index.html"
    atomic_write(html_path, review_html.render_page(job_info, summary, shown))
    manifest = {"job": job_info, "counts": summary["by_status"], "total": summary["total"],
                "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), "files": ["results.csv", "results.jsonl", "index.html", THUMBS + "/"]}
    write_json(out_dir / "manifest.json", manifest)
    return {"csv": csv_path, "jsonl": jsonl_path, "html": html_path, "manifest": out_dir / "manifest.json"}


def _attach_thumbs(store: Store, out_dir: Path, rows: list[dict], cfg: ReviewConfig, job_info: dict) -> None:
    """Set `thumb` on each shown row and its neighbours; make the missing ones (cached as files)."""
    thumbs = out_dir / THUMBS
    review = job_info["settings"].get("review", {})
    preset, dpi = review.get("preset", "clean"), int(review.get("dpi") or 100)
    for row in rows:
        name = f"chart-{row['id']}.jpg"
        opened = "open" in row["timings"] or "embed" in row["timings"]  # it opened once: draw it again
        if not (thumbs / name).exists() and opened:
            meta = case_meta(store, [row["chart"]]).get(row["chart"], {})
            try:
                page = open_chart(chart_kind(row["chart"]), row["path"], meta, preset, dpi, row["chart"])
                write_thumb(out_dir, name, jpeg_bytes(page, cfg.thumb_width))
            except Exception:  # the file moved since it was reviewed: the row shows no picture
                pass
        row["thumb"] = f"{THUMBS}/{name}" if (thumbs / name).exists() else None
    need = {int(n["case_id"]): n for row in rows for n in row["neighbours"]}
    missing = [cid for cid in need if not (thumbs / f"case-{cid}.jpg").exists()]
    by_id: dict[int, Case] = {}
    if missing and any(not (need[c].get("image_path") and Path(need[c]["image_path"]).exists()) for c in missing):
        with store.session() as s:
            by_id = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(missing)))}
    for cid in missing:
        try:
            src = need[cid].get("image_path")
            if src and Path(src).exists():
                data = jpeg_bytes(load_image(src), cfg.thumb_width)
            elif cid in by_id:
                data = jpeg_bytes(render_page(load_case_record(by_id[cid]), preset="clean", seed=0, dpi=dpi),
                                  cfg.thumb_width)
            else:
                continue
            write_thumb(out_dir, f"case-{cid}.jpg", data)
        except Exception:  # an unreadable reference page: that neighbour shows no picture
            continue
    for row in rows:
        for n in row["neighbours"]:
            name = f"case-{int(n['case_id'])}.jpg"
            n["thumb"] = f"{THUMBS}/{name}" if (thumbs / name).exists() else None
