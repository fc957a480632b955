"""What a review reads: a folder, a CSV list or a store query of charts -> charts in a stable order.

Each chart gets a key that is stable across runs (its relative path, or `case:<id>`), so a re-run of the
same command finds the same job and the same items, and a fingerprint of its file (size + mtime_ns), so a
file replaced at the same path is reviewed again. A folder is the untrusted edge: every file in it gets a
row, and what is not a chart (another file type, a link out of the folder, a pipe, a name that is not UTF-8)
is a chart with `error` set, recorded as an error row and never opened. A PDF of N > 1 pages is N charts, keyed
and pathed `scan.pdf#page=1` ... `#page=N` (each its own row and result; a 1-page PDF keeps its plain name), up to
MAX_PDF_PAGES; the pages past that are one error row.
"""
from __future__ import annotations

import csv
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from rag_ecg.data.images import (FORMATS, IMAGE_SUFFIXES, MAX_PDF_PAGES, ImageLoadError, page_name, pdf_page_count,
                                  split_page)
from rag_ecg.data.store import Case, Store
from rag_ecg.review.config import ReviewError

STORE_FILTERS = ("source", "fold", "split", "limit")


@dataclass(frozen=True)
class Chart:
    """One chart of the input: `key` is stable across runs (relative path, or `case:<id>`)."""

    key: str
    path: str  # image/PDF file (`x.pdf#page=N`: one page), WFDB record path without extension, or a case's signal path
    kind: str  # image | wfdb | case
    error: str | None = None  # set: not a chart (one line naming it); recorded as an error, never read
    fingerprint: str | None = None  # the file's content identity (`fingerprint`): a replaced file is redone


def fingerprint(kind: str, path: str) -> str | None:
    """`size:mtime_ns` of a chart's file(s) (a WFDB record: its .hea and its other files), None if unreadable.

    Why not a content hash: a resume would then read every byte of the input (10^5 charts: tens of GB) just
    to find nothing to do, while any write, copy or replace of a file sets a new mtime_ns (nanoseconds) and
    usually a new size; only a same-size replacement that also copies the old file's exact mtime_ns would be
    missed. A file merely touched is reviewed again, which costs one chart and changes nothing."""
    p = Path(split_page(path)[0] if kind == "image" else path)  # every page of a PDF: the file's identity
    parts = sorted(p.parent.glob(f"{glob.escape(p.name)}.*")) if kind == "wfdb" else [p]
    try:
        stats = [(q.name, os.stat(q)) for q in parts]
    except OSError:
        return None
    if not stats:
        return None
    if len(stats) == 1:
        return f"{stats[0][1].st_size}:{stats[0][1].st_mtime_ns}"
    return ";".join(f"{name}={st.st_size}:{st.st_mtime_ns}" for name, st in stats)[:255]


def chart_kind(key: str) -> str:
    """The kind of a chart from its key (so pending items can be rebuilt from their store rows)."""
    if key.startswith("case:"):
        return "case"
    return "wfdb" if key.lower().endswith(".hea") else "image"


def discover(input: str | Path, store: Store | None = None, out_dir: Path | None = None,
             limit: int | None = None) -> tuple[str, list[Chart]]:
    """Input -> (descriptor for the job key, charts in a stable order).

    A folder is walked recursively: pictures (IMAGE_SUFFIXES) and WFDB `.hea` records are charts, every other
    file is a chart with `error` set (hidden files, a record's companion files and `out_dir` excepted);
    links are followed only to files inside the folder; a `.csv` needs a `path` column (relative paths
    resolved against its folder); `store:source=ptbxl,fold=9[,split=val][,limit=50]` selects store cases,
    drawn as pages; a single chart file is a batch of one.
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
        charts = _pages(Chart(path.name, str(path.with_suffix("") if kind == "wfdb" else path), kind))
        desc = f"file:{path}"
    else:
        raise ReviewError(f"{text}: not a folder, a .csv list or a chart file "
                          f"({', '.join(IMAGE_SUFFIXES)}, .hea)")
    if not any(c.error is None for c in charts):
        other = next((f"; {len(charts)} other file(s), e.g. {c.error}" for c in charts), "")
        raise ReviewError(f"{text}: no charts found ({FORMATS} files or WFDB .hea records)"
                          f"{other}")
    return desc, charts[:limit] if limit else charts


def _discover_folder(root: Path, out_dir: Path | None) -> list[Chart]:
    skip = out_dir.resolve() if out_dir is not None else None
    charts: list[Chart] = []

    def unreadable(exc: OSError) -> None:  # os.walk could not list a folder: its row says so
        where = Path(exc.filename or root)
        if where == root:
            raise ReviewError(f"{root}: cannot list the folder ({exc.strerror or exc})")
        charts.append(_rejected(root, where, f"cannot list the folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # never descends into links
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            p = here / d
            if d.startswith(".") or p == skip:
                continue
            if p.is_symlink():
                inside = _inside(root, p)
                charts.append(_rejected(root, p, "a link to a folder (links to folders are not followed)" if inside
                                        else "a link to outside the input folder (not followed)"))
            else:
                keep.append(d)
        dirnames[:] = keep
        records = {n[:-4] for n in filenames if n.lower().endswith(".hea")}
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != ".hea" and Path(name).stem in records:
                continue  # a WFDB record's signal/annotation file (X.dat, X.atr, ... next to X.hea)
            charts.extend(_pages(_folder_chart(root, here / name, suffix)))
    return sorted(charts, key=_order)


def _order(c: Chart) -> tuple[str, int]:
    """Charts by key, a PDF's pages in page order (`#page=10` after `#page=9`)."""
    name, page = split_page(c.key)
    return name, page + (name != c.key)


def _pages(c: Chart) -> list[Chart]:
    """A chart, or each page of a multi-page PDF as its own (`key#page=N`; beyond MAX_PDF_PAGES one error row).
    A PDF that cannot be counted stays one chart: loading it says what is wrong."""
    if c.error or c.kind != "image" or not c.path.lower().endswith(".pdf"):
        return [c]
    try:
        n = pdf_page_count(c.path)
    except ImageLoadError:
        return [c]
    if n <= 1:
        return [c]
    out = [Chart(page_name(c.key, k), page_name(c.path, k), "image", fingerprint=c.fingerprint)
           for k in range(min(n, MAX_PDF_PAGES))]
    if n > MAX_PDF_PAGES:
        rest = f"{c.key}#pages={MAX_PDF_PAGES + 1}-{n}"
        out.append(Chart(rest, c.path, "image", f"{rest}: not read (a PDF is read up to {MAX_PDF_PAGES} pages; "
                                                f"this one has {n}: split it)", c.fingerprint))
    return out


def _folder_chart(root: Path, p: Path, suffix: str) -> Chart:
    """One file of an input folder as a chart, or as a rejected one (never opened) saying why."""
    rel = p.relative_to(root).as_posix()
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates: no database can hold them
        return _rejected(root, p, "file name is not valid UTF-8 (rename the file)")
    try:
        st = os.lstat(p)
        real = p
        if stat.S_ISLNK(st.st_mode):
            if not _inside(root, p):
                return _rejected(root, p, "a link to outside the input folder (not followed)")
            try:
                st = os.stat(p)
            except OSError:
                return _rejected(root, p, "a broken link (its target does not exist)")
            real = Path(os.path.realpath(p))  # read the target itself: the link cannot be re-aimed later
    except OSError as exc:
        return _rejected(root, p, f"cannot read ({exc.strerror or exc})")
    if not stat.S_ISREG(st.st_mode):
        return _rejected(root, p, "not a regular file (a pipe, socket or device)")
    if suffix in IMAGE_SUFFIXES:
        return Chart(rel, str(real), "image", fingerprint=fingerprint("image", str(real)))
    if suffix == ".hea":
        for part in sorted(p.parent.glob(f"{glob.escape(p.stem)}.*")):  # its .dat etc. must not lead outside
            if part.is_symlink() and not _inside(root, part):
                return _rejected(root, p, f"its file {part.name} is a link to outside the input folder")
        return Chart(rel, str(real.with_suffix("")), "wfdb", fingerprint=fingerprint("wfdb", str(real.with_suffix(""))))
    return _rejected(root, p, f"not an ECG picture or WFDB record: {suffix or 'no file suffix'}")


def _inside(root: Path, p: Path) -> bool:
    """Whether a path, links resolved, stays inside `root` (itself resolved)."""
    return Path(os.path.realpath(p)).is_relative_to(root)


def _rejected(root: Path, p: Path, why: str) -> Chart:
    """A rejected chart: keyed by its relative path (undecodable bytes escaped), `error` naming it."""
    rel = os.fsencode(p.relative_to(root).as_posix()).decode("utf-8", "backslashreplace")
    return Chart(rel, str(root / rel), "image", f"{rel}: {why}")


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
            rec = str(p.with_suffix("") if p.suffix.lower() == ".hea" else p)
            charts.append(Chart(key, rec, "wfdb", fingerprint=fingerprint("wfdb", rec)))
        else:
            charts.extend(_pages(Chart(key, str(p), "image", fingerprint=fingerprint("image", str(p)))))
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
