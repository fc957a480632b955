"""The durable review job in the store: one ReviewJob per input + settings, one ReviewItem per chart.

Why SQL: a run may die at any moment, so a batch's results and statuses are written in one transaction and
every chart counts its attempts; a re-run finds the job by its key and only does what is still pending.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from rag_ecg.data.store import Case, ReviewItem, ReviewJob, Store
from rag_ecg.io import atomic_write
from rag_ecg.review.config import STATUSES, THUMBS, ReviewConfig
from rag_ecg.review.inputs import Chart
from rag_ecg.review.pipeline import ChartResult


def job_key(descriptor: str, cfg: ReviewConfig, index: dict) -> str:
    """sha256 of the input, the result settings and the index identity: the same command, the same job."""
    blob = json.dumps({"input": descriptor, "settings": cfg.result_settings(),
                       "index": {k: index[k] for k in ("path", "encoder_hash", "built")}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_job(store: Store, key: str, descriptor: str, out_dir: Path, settings: dict) -> tuple[int, bool]:
    """(job id, existed before): find the job by key, or create it (safe against a concurrent creator)."""
    with store.session() as s:
        job = s.scalar(select(ReviewJob).where(ReviewJob.key == key))
        if job is not None:  # the same job: record where this run writes and with what settings
            job.out_dir, job.status, job.settings = str(out_dir), "running", settings
            return job.id, True
    try:
        with store.session() as s:
            job = ReviewJob(key=key, input=descriptor, out_dir=str(out_dir), settings=settings, status="running")
            s.add(job)
            s.flush()
            return job.id, False
    except IntegrityError:
        with store.session() as s:
            return s.scalar(select(ReviewJob.id).where(ReviewJob.key == key)), True


def add_items(store: Store, job_id: int, charts: Sequence[Chart], chunk: int = 1000) -> int:
    """Insert the charts the job does not hold yet (pending); returns how many were added."""
    with store.session() as s:
        have = set(s.scalars(select(ReviewItem.chart_key).where(ReviewItem.job_id == job_id)))
    new = [c for c in charts if c.key not in have]
    for lo in range(0, len(new), chunk):
        with store.session() as s:
            s.execute(insert(ReviewItem), [{"job_id": job_id, "chart_key": c.key, "path": c.path,
                                            "status": "pending", "attempts": 0, "timings": {}}
                                           for c in new[lo:lo + chunk]])
    return len(new)


def reject_items(store: Store, job_id: int, charts: Sequence[Chart]) -> None:
    """Record the input's files that are not charts (`Chart.error`) as error rows: never loaded, even after
    `reset_errors`, and a file that became one since a result was kept loses that result."""
    rejected = [c for c in charts if c.error]
    now = datetime.now(timezone.utc)
    with store.session() as s:
        for c in rejected:
            s.execute(update(ReviewItem).where(ReviewItem.job_id == job_id, ReviewItem.chart_key == c.key,
                                               or_(ReviewItem.status != "error", ReviewItem.error.is_(None),
                                                   ReviewItem.error != c.error, ReviewItem.path != c.path))
                      .values(status="error", error=c.error, path=c.path, attempts=0, timings={}, report=None,
                              neighbours=None, finished_at=now))


def status_counts(store: Store, job_id: int) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(select(ReviewItem.status, func.count()).where(ReviewItem.job_id == job_id)
                         .group_by(ReviewItem.status)).all()
    out = dict.fromkeys(STATUSES, 0)
    out.update({st: int(n) for st, n in rows})
    return out


def pending_batches(store: Store, job_id: int, batch_size: int) -> Iterator[list[tuple[int, str, str, int]]]:
    """Pending items as batches of (id, chart_key, path, attempts), by id, read page by page."""
    last = 0
    while True:
        with store.session() as s:
            rows = s.execute(select(ReviewItem.id, ReviewItem.chart_key, ReviewItem.path, ReviewItem.attempts)
                             .where(ReviewItem.job_id == job_id, ReviewItem.status == "pending",
                                    ReviewItem.id > last)
                             .order_by(ReviewItem.id).limit(batch_size * 8)).all()
        if not rows:
            return
        last = rows[-1][0]
        for lo in range(0, len(rows), batch_size):
            yield [tuple(r) for r in rows[lo:lo + batch_size]]


def case_meta(store: Store, keys: Sequence[str]) -> dict[str, dict]:
    """Store charts' case metadata (source, external id, patient) by chart key."""
    ids = [int(k[5:]) for k in keys if k.startswith("case:") and k[5:].isdigit()]
    if not ids:
        return {}
    with store.session() as s:
        rows = s.execute(select(Case.id, Case.source, Case.external_id, Case.patient_id)
                         .where(Case.id.in_(ids))).all()
    return {f"case:{cid}": {"source": src, "external_id": ext, "patient_id": pat} for cid, src, ext, pat in rows}


def start_attempts(store: Store, batch: Sequence[tuple], max_attempts: int) -> list[ChartResult]:
    """Count an attempt for each chart of the batch (committed first); charts that had already used up
    `max_attempts` (runs died while on them) come back as error results instead of being tried again."""
    ids = [b[0] for b in batch]
    keys = {b[0]: b[1] for b in batch}
    with store.session() as s:
        s.execute(update(ReviewItem).where(ReviewItem.id.in_(ids)).values(attempts=ReviewItem.attempts + 1))
        rows = s.execute(select(ReviewItem.id, ReviewItem.attempts, ReviewItem.error)
                         .where(ReviewItem.id.in_(ids))).all()
    return [ChartResult(item_id, "error", f"{keys[item_id]}: gave up after {attempts - 1} attempts "
                                          f"({error or 'the review stopped while processing this chart'})")
            for item_id, attempts, error in sorted(rows) if attempts > max_attempts]


def write_thumb(out_dir: Path, name: str, data: bytes) -> None:
    atomic_write(out_dir / THUMBS / name, data)


def commit_results(store: Store, out_dir: Path, results: Sequence[ChartResult]) -> None:
    """Thumbnails first, then every result of the batch (status + data) in one transaction."""
    for r in results:
        if r.thumb:
            write_thumb(out_dir, f"chart-{r.item_id}.jpg", r.thumb)
    now = datetime.now(timezone.utc)
    with store.session() as s:
        for r in results:
            item = s.get(ReviewItem, r.item_id)
            if item is None:
                continue
            item.status, item.error, item.timings = r.status, r.error, dict(r.timings)
            item.report, item.neighbours = r.report, r.neighbours
            item.finished_at = now if r.status != "pending" else None


def reset_errors(store: Store, job_id: int) -> None:
    """Put the job's charts that ended in error, or whose answer was no report (unparsed), back to pending,
    with their attempts cleared."""
    with store.session() as s:
        s.execute(update(ReviewItem).where(ReviewItem.job_id == job_id,
                                           ReviewItem.status.in_(("error", "unparsed")))
                  .values(status="pending", attempts=0))


def mark_done(store: Store, job_id: int) -> None:
    """Record that the job has nothing left pending."""
    with store.session() as s:
        job = s.get(ReviewJob, job_id)
        job.status, job.finished_at = "done", datetime.now(timezone.utc)
