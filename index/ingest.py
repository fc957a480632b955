"""Ingest job: WFDB records (PTB-XL, LUDB, or any folder) -> validated cases in the case store.

Idempotent (cases are keyed by source + external id: a re-run never duplicates, and writes - and counts as
updated - only the cases whose record or metadata changed), one transaction per batch (a crash loses at
most the batch in flight), and bad records are skipped with a one-line reason that is logged (warning),
returned, and kept in the store (`ingest_skips`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import select

from rag_ecg.data.records import (ECGRecord, RecordError, find_wfdb_records, ptbxl_record, read_ludb,
                                  read_ptbxl_index, read_wfdb)
from rag_ecg.data.store import (Case, IngestRun, IngestSkip, Store, case_changes, case_from_record,
                                upsert_scp_statements)
from rag_ecg.errors import InputError

log = logging.getLogger(__name__)

SOURCES = ("ptbxl", "ludb", "wfdb")


@dataclass
class IngestResult:
    source: str
    path: str
    seen: int = 0
    inserted: int = 0
    updated: int = 0
    skipped: list[str] = field(default_factory=list)  # one line per skipped record


# A unit of work: external id + a thunk that reads (and validates) the record.
Job = tuple[str, Callable[[], ECGRecord]]


def ptbxl_jobs(root: Path, store: Store) -> list[Job]:
    rows, statements = read_ptbxl_index(root)
    with store.session() as s:
        upsert_scp_statements(s, statements)
    return [(r.ecg_id, (lambda r=r: ptbxl_record(r))) for r in rows]


def ludb_jobs(root: Path) -> list[Job]:
    folder = root / "data" if (root / "data").is_dir() else root
    found = find_wfdb_records(folder)
    if not found:
        raise RecordError(f"{root}: no WFDB records (.hea) found")
    return [(p.name, (lambda p=p: read_ludb(p))) for p in found]


def wfdb_jobs(root: Path) -> list[Job]:
    found = [root.with_suffix("")] if root.suffix == ".hea" else find_wfdb_records(root)
    if not found:
        raise RecordError(f"{root}: no WFDB records (.hea) found")
    base = root if root.is_dir() else root.parent
    return [(str(p.relative_to(base)), (lambda p=p, rid=str(p.relative_to(base)): read_wfdb(p, record_id=rid)))
            for p in found]


def ingest(store: Store, source: str, path: str | Path, batch_size: int = 64, limit: int | None = None,
           progress: bool = True) -> IngestResult:
    """Read every record under `path` as `source` and upsert it into the store."""
    if source not in SOURCES:
        raise InputError(f"unknown source {source!r} (choose from {', '.join(SOURCES)})")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    jobs = {"ptbxl": lambda: ptbxl_jobs(root, store), "ludb": lambda: ludb_jobs(root),
            "wfdb": lambda: wfdb_jobs(root)}[source]()
    if limit is not None:
        jobs = jobs[:limit]
    result = IngestResult(source=source, path=str(root.resolve()))
    with store.session() as s:
        run = IngestRun(source=source, path=result.path)
        s.add(run)
        s.flush()
        run_id = run.id
    with _progress(progress) as bar:
        task = bar.add_task(f"ingest {source}", total=len(jobs))
        for batch in _batches(jobs, batch_size):
            records, errors = [], []
            for ext_id, read in batch:
                try:
                    records.append((ext_id, read()))
                except RecordError as exc:
                    errors.append(str(exc))
            _upsert(store, source, records, errors, run_id, result)
            for e in errors:
                log.warning("skipped %s", e)
            result.seen += len(batch)
            bar.advance(task, len(batch))
    with store.session() as s:
        run = s.get(IngestRun, run_id)
        run.inserted, run.updated, run.skipped = result.inserted, result.updated, len(result.skipped)
        run.finished_at = datetime.now(timezone.utc)
    return result


def _upsert(store: Store, source: str, records: list[tuple[str, ECGRecord]], errors: list[str],
            run_id: int, result: IngestResult) -> None:
    """One transaction per batch: all of it lands, or none of it does."""
    with store.session() as s:
        ids = [ext for ext, _ in records]
        existing = {c.external_id: c for c in s.scalars(
            select(Case).where(Case.source == source, Case.external_id.in_(ids)))} if ids else {}
        for ext_id, rec in records:
            values = case_from_record(rec, ext_id)
            values["source"] = source
            case = existing.get(ext_id)
            if case is None:
                s.add(Case(**values))
                result.inserted += 1
            else:
                changes = case_changes(case, values)  # an unchanged record is left alone: a re-run writes nothing
                if changes:
                    for k, v in changes.items():
                        setattr(case, k, v)
                    result.updated += 1
        for e in errors:
            s.add(IngestSkip(run_id=run_id, record=e.split(":", 1)[0], error=e))
    result.skipped.extend(errors)


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)
