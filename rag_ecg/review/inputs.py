"""What a review reads: a folder, a CSV list or a store query of charts -> charts in a stable order.

Each chart gets a key that is stable across runs (its relative path, or `case:<id>`), so a re-run of the
same command finds the same job and the same items.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from rag_ecg.data.images import IMAGE_SUFFIXES
from rag_ecg.data.store import Case, Store
from rag_ecg.review.config import ReviewError

STORE_FILTERS = ("source", "fold", "split", "limit")


@dataclass(frozen=True)
class Chart:
    """One chart of the input: `key` is stable across runs (relative path, or `case:<id>`)."""

    key: str
    path: str  # image/PDF file, WFDB record path without extension, or a store case's signal path
    kind: str  # image | wfdb | case


def chart_kind(key: str) -> str:
    """The kind of a chart from its key (so pending items can be rebuilt from their store rows)."""
    if key.startswith("case:"):
        return "case"
    return "wfdb" if key.lower().endswith(".hea") else "image"


def discover(input: str | Path, store: Store | None = None, out_dir: Path | None = None,
             limit: int | None = None) -> tuple[str, list[Chart]]:
    """Input -> (descriptor for the job key, charts in a stable order).

    A folder is walked recursively (PNG/JPEG/BMP/TIFF/PDF files and WFDB `.hea` records; `out_dir` and
    hidden folders skipped); a `.csv` needs a `path` column (relative paths resolved against its folder);
    `store:source=ptbxl,fold=9[,split=val][,limit=50]` selects store cases, drawn as pages; a single
    chart file is a batch of one.
    """
    text = str(input)
    if text.startswith("store:"):
        if store is None:
            raise ReviewError(f"{text}: a store query needs a store")
        return _discover_store(text, store, limit)
    path = Path(text).expanduser()
    if not path.exists():
        raise ReviewError(f"{text}: no such file or folder (expected a folder of charts, a CSV with a path "
                          f"column, or store:source=...,fold=...)")
    path = path.resolve()
    if path.is_dir():
        charts = _discover_folder(path, out_dir)
        desc = f"dir:{path}"
    elif path.suffix.lower() == ".csv":
        charts = _discover_csv(path)
        desc = f"csv:{path}"
    elif path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == ".hea":
        kind = "wfdb" if path.suffix.lower() == ".hea" else "image"
        charts = [Chart(path.name, str(path.with_suffix("") if kind == "wfdb" else path), kind)]
        desc = f"file:{path}"
    else:
        raise ReviewError(f"{text}: not a folder, a .csv list or a chart file "
                          f"({', '.join(IMAGE_SUFFIXES)}, .hea)")
    if not charts:
        raise ReviewError(f"{text}: no charts found (PNG/JPEG/BMP/TIFF/PDF files or WFDB .hea records)")
    return desc, charts[:limit] if limit else charts


def _discover_folder(root: Path, out_dir: Path | None) -> list[Chart]:
    skip = out_dir.resolve() if out_dir is not None else None
    charts = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            p = here / name
            rel = p.relative_to(root).as_posix()
            if suffix in IMAGE_SUFFIXES:
                charts.append(Chart(rel, str(p), "image"))
            elif suffix == ".hea":
                charts.append(Chart(rel, str(p.with_suffix("")), "wfdb"))
    return sorted(charts, key=lambda c: c.key)


def _discover_csv(path: Path) -> list[Chart]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = cols = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in cols:
                raise ReviewError(f"{path}: no 'path' column (columns: {', '.join(cols) or 'none'})")
            values = [(row.get("path") or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReviewError(f"{path}: unreadable CSV ({exc})") from None
    charts, seen = [], set()
    for v in values:
        if not v:
            continue
        p = Path(v).expanduser()
        p = p if p.is_absolute() else path.parent / p
        is_wfdb = p.suffix.lower() == ".hea" or (p.suffix.lower() not in IMAGE_SUFFIXES
                                                   and p.with_name(p.name + ".hea").exists())
        key = v if (not is_wfdb or v.lower().endswith(".hea")) else v + ".hea"
        if key in seen:
            continue
        seen.add(key)
        if is_wfdb:
            charts.append(Chart(key, str(p.with_suffix("") if p.suffix.lower() == ".hea" else p), "wfdb"))
        else:
            charts.append(Chart(key, str(p), "image"))
    return charts


def parse_store_query(text: str) -> dict:
    """`store:source=ptbxl,fold=9,limit=50` -> {"source": "ptbxl", "fold": 9, "limit": 50}."""
    body = text[len("store:"):].strip()
    out: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise ReviewError(f"{text}: {part!r} is not name=value")
        if name not in STORE_FILTERS:
            raise ReviewError(f"{text}: unknown filter {name!r} (use {', '.join(STORE_FILTERS)})")
        if name in ("fold", "limit"):
            try:
                out[name] = int(value)
            except ValueError:
                raise ReviewError(f"{text}: {name} must be an integer, got {value!r}") from None
        else:
            out[name] = value
    return out


def _discover_store(text: str, store: Store, limit: int | None) -> tuple[str, list[Chart]]:
    q = parse_store_query(text)
    stmt = select(Case.id, Case.signal_path).order_by(Case.id)
    if "source" in q:
        stmt = stmt.where(Case.source == q["source"])
    if "fold" in q:
        stmt = stmt.where(Case.fold == q["fold"])
    if "split" in q:
        stmt = stmt.where(Case.split == q["split"])
    caps = [x for x in (q.get("limit"), limit) if x]
    if caps:
        stmt = stmt.limit(min(caps))
    with store.session() as s:
        rows = s.execute(stmt).all()
    if not rows:
        raise ReviewError(f"{text}: no cases in {store!r} match")
    desc = "store:" + ",".join(f"{k}={q[k]}" for k in sorted(q) if k != "limit")
    charts = [Chart(f"case:{cid}", sig, "case") for cid, sig in rows]
    return desc, charts
