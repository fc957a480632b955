"""The durable review job in the store: one ReviewJob per input + settings, one ReviewItem per chart.

Why SQL: a run may die at any moment, so a batch's results and statuses are written in one transaction and
every chart counts its attempts; a re-run finds the job by its key and only does what is still pending.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from rag_ecg.data.store import Base, Case, ReviewItem, ReviewJob, Store
from rag_ecg.io import atomic_write
from rag_ecg.review.config import STATUSES, THUMBS, ReviewConfig, ReviewError
from rag_ecg.review.inputs import Chart
from rag_ecg.review.pipeline import ChartResult

log = logging.getLogger(__name__)


class ReviewVerdict(Base):
    """A reviewer's decision on one chart of a job (`review.verdicts` imports them): one row per chart, the latest."""

    __tablename__ = "review_verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("review_jobs.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), unique=True)
    chart_key: Mapped[str] = mapped_column(Text)
    verdict: Mapped[str | None] = mapped_column(String(16))  # agree | disagree | None (a comment alone)
    comment: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # when the reviewer decided
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def ensure_verdict_table(store: Store) -> None:
    """Create the verdict table in a store opened before this module was imported (safe when racing)."""
    try:
        ReviewVerdict.__table__.create(store.engine, checkfirst=True)
    except DBAPIError:  # another process created it at the same moment
        ReviewVerdict.__table__.create(store.engine, checkfirst=True)


def job_verdicts(store: Store, job_id: int) -> dict[int, dict]:
    """item id -> {verdict, comment, decided_at (ISO, UTC)} of the job's stored verdicts."""
    ensure_verdict_table(store)
    with store.session() as s:
        rows = s.scalars(select(ReviewVerdict).where(ReviewVerdict.job_id == job_id)).all()
    return {v.item_id: {"verdict": v.verdict or "", "comment": v.comment or "",
                        "decided_at": _utc(v.decided_at).isoformat() if v.decided_at else ""} for v in rows}


def job_key(descriptor: str, cfg: ReviewConfig, index: dict) -> str:
    """sha256 of the input, the result settings and the index identity: the same command, the same job."""
    ident = {k: index[k] for k in ("path", "encoder_hash", "built")}
    if index.get("calibration"):  # a site calibration changes every probability: another job
        ident["calibration"] = index["calibration"]
    blob = json.dumps({"input": descriptor, "settings": cfg.result_settings(), "index": ident}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def last_version(store: Store, key: str) -> str | None:
    """The rag-ecg version the job's last run recorded (None: a new job, or one from before versions were kept)."""
    with store.session() as s:
        settings = s.scalar(select(ReviewJob.settings).where(ReviewJob.key == key))
    return (settings or {}).get("rag_ecg_version")


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
    """Insert the charts the job does not hold yet (pending); returns how many were added. A chart whose file
    was replaced since (another fingerprint) has its row reset to pending: the old result is superseded."""
    with store.session() as s:
        have = {key: (item_id, fp) for item_id, key, fp in s.execute(
            select(ReviewItem.id, ReviewItem.chart_key, ReviewItem.fingerprint).where(ReviewItem.job_id == job_id))}
    new = [c for c in charts if c.key not in have]
    for lo in range(0, len(new), chunk):
        with store.session() as s:
            s.execute(insert(ReviewItem), [{"job_id": job_id, "chart_key": c.key, "path": c.path,
                                            "status": "pending", "attempts": 0, "timings": {},
                                            "fingerprint": c.fingerprint}
                                           for c in new[lo:lo + chunk]])
    seen = [c for c in charts if c.key in have and c.fingerprint and c.fingerprint != have[c.key][1]]
    replaced = [c for c in seen if have[c.key][1] is not None]  # NULL: a row from before fingerprints
    with store.session() as s:
        for c in seen:
            values: dict = {"fingerprint": c.fingerprint}
            if have[c.key][1] is not None:
                values.update(status="pending", path=c.path, attempts=0, error=None, timings={}, report=None,
                              neighbours=None, finished_at=None)
            s.execute(update(ReviewItem).where(ReviewItem.id == have[c.key][0]).values(**values))
    if replaced:
        ensure_verdict_table(store)
        with store.session() as s:  # a reviewer's verdict was on the old file: it goes with the old result
            s.execute(delete(ReviewVerdict).where(ReviewVerdict.item_id.in_([have[c.key][0] for c in replaced])))
        log.info("%d chart(s) replaced since the last run are reviewed again, e.g. %s", len(replaced),
                 replaced[0].key)
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
    """Store charts' case metadata (source, external id, patient; age and sex for the measurements) by chart key."""
    ids = [int(k[5:]) for k in keys if k.startswith("case:") and k[5:].isdigit()]
    if not ids:
        return {}
    with store.session() as s:
        rows = s.execute(select(Case.id, Case.source, Case.external_id, Case.patient_id, Case.age, Case.sex)
                         .where(Case.id.in_(ids))).all()
    return {f"case:{cid}": {"source": src, "external_id": ext, "patient_id": pat, "age": age, "sex": sex}
            for cid, src, ext, pat, age, sex in rows}


def start_attempts(store: Store, batch: Sequence[tuple], max_attempts: int,
                   lease: Lease | None = None) -> list[ChartResult]:
    """Count an attempt for each chart of the batch (committed first); charts that had already used up
    `max_attempts` (runs died while on them) come back as error results instead of being tried again.
    With `lease`: only while this run still holds the job (else a ReviewError, nothing counted)."""
    ids = [b[0] for b in batch]
    keys = {b[0]: b[1] for b in batch}
    with store.session() as s:
        _hold(s, lease)
        s.execute(update(ReviewItem).where(ReviewItem.id.in_(ids)).values(attempts=ReviewItem.attempts + 1))
        rows = s.execute(select(ReviewItem.id, ReviewItem.attempts, ReviewItem.error)
                         .where(ReviewItem.id.in_(ids))).all()
    return [ChartResult(item_id, "error", f"{keys[item_id]}: gave up after {attempts - 1} attempts "
                                          f"({error or 'the review stopped while processing this chart'})")
            for item_id, attempts, error in sorted(rows) if attempts > max_attempts]


def claim_pending(store: Store, job_id: int, lease: Lease | None = None) -> list[tuple[int, str, str]]:
    """Every pending chart of the job as (id, chart_key, path), each counted one attempt, in one transaction
    (the Ray engine's start: Ray retries tasks itself). With `lease`: only while this run holds the job."""
    with store.session() as s:
        _hold(s, lease)
        rows = s.execute(select(ReviewItem.id, ReviewItem.chart_key, ReviewItem.path)
                         .where(ReviewItem.job_id == job_id, ReviewItem.status == "pending")
                         .order_by(ReviewItem.id)).all()
        s.execute(update(ReviewItem).where(ReviewItem.job_id == job_id, ReviewItem.status == "pending")
                  .values(attempts=ReviewItem.attempts + 1))
    return [tuple(r) for r in rows]


def write_thumb(out_dir: Path, name: str, data: bytes) -> None:
    atomic_write(out_dir / THUMBS / name, data)


def commit_results(store: Store, out_dir: Path, results: Sequence[ChartResult], lease: Lease | None = None) -> None:
    """Thumbnails first, then every result of the batch (status + data) in one transaction. A `pending`
    result (a BackendError: server down, 5xx, timeout) gives back the attempt `start_attempts` counted, so
    an outage never uses up a chart's attempts; only runs that died on the chart count. With `lease`: all
    of it after the lease's renewal in that transaction, so a run that lost the job writes nothing (a
    ReviewError)."""
    with store.session() as s:
        _hold(s, lease)
        for r in results:
            for name, data in ((f"chart-{r.item_id}.jpg", r.thumb), (f"chart-{r.item_id}-full.jpg", r.full),
                               (f"chart-{r.item_id}-overlay.jpg", r.overlay)):
                if data:
                    write_thumb(out_dir, name, data)
            if r.full and not r.overlay:  # opened again, no traces read this time: no stale overlay of an old file
                (out_dir / THUMBS / f"chart-{r.item_id}-overlay.jpg").unlink(missing_ok=True)
        now = datetime.now(timezone.utc)
        for r in results:
            item = s.get(ReviewItem, r.item_id)
            if item is None:
                continue
            item.status, item.error, item.timings = r.status, r.error, dict(r.timings)
            item.report, item.neighbours = r.report, r.neighbours
            item.finished_at = now if r.status != "pending" else None
            if r.status == "pending":  # the backend failed, not the chart: this attempt does not count
                item.attempts = max(0, (item.attempts or 0) - 1)


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


# -- the job lease: one run at a time per job ------------------------------------------------------------
LEASE_S = 900  # renewed with every claimed and committed batch; a run that stops renewing loses it after this


@dataclass(frozen=True)
class Lease:
    """A run's hold on its job (`take_lease`). Given to `start_attempts` / `commit_results`, it is renewed in
    the transaction that claims or commits a batch, so a run whose lease ran out and was taken over stops
    there: it never processes or overwrites a chart the run that took over owns."""

    job_id: int
    owner: str
    seconds: float = LEASE_S


def lease_owner() -> str:
    """This run's lease name: `host:pid:token` (host and pid tell people, and a later run, who holds it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _utc(t: datetime | None) -> datetime | None:
    """`t` in UTC: SQLite gives back naive UTC, PostgreSQL the session's time zone (messages say UTC)."""
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _db_now(s: Session) -> datetime:
    """The database's clock: runs on hosts whose clocks disagree still agree on when a lease runs out.
    (SQLite is a file on this host: this host's clock is the one every run of it reads.)"""
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        return datetime.now(timezone.utc)
    # PostgreSQL's now() is the transaction's start, which a wait for a row lock leaves behind
    return _utc(s.scalar(select(func.clock_timestamp() if dialect == "postgresql" else func.now())))


def _dead_here(holder: str) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (a killed run: stale at once)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _busy(job_id: int, holder: str, since: datetime | None, until: datetime | None) -> ReviewError:
    host, _, rest = holder.partition(":")
    when = _utc(since).strftime("%Y-%m-%d %H:%M:%S UTC") if since else "an unknown time"
    ends = f"{_utc(until):%H:%M:%S} UTC" if until else "once it is released"
    return ReviewError(f"job {job_id} is being processed by another run (pid {rest.partition(':')[0]} on host "
                       f"{host}) since {when}; wait for it to finish (a dead run's lease runs out at {ends})")


def take_lease(store: Store, job_id: int, owner: str, lease_s: float = LEASE_S) -> Lease:
    """Take the job for this run, or a ReviewError naming the run that holds it. Free: nobody holds it, its
    lease ran out (on the database's clock), or its holder's process on this host is gone.

    PostgreSQL: the job row is read FOR UPDATE, so runs starting at once take turns and each later one sees
    the winner. SQLite (no row locks): the UPDATE is a compare-and-set on the holder that was read, so of two
    runs that read the same holder exactly one wins; the other reads the winner back and names it."""
    with store.session() as s:
        holder, since, until = s.execute(select(ReviewJob.locked_by, ReviewJob.locked_at, ReviewJob.lease_until)
                                         .where(ReviewJob.id == job_id).with_for_update()).one()
        now = _db_now(s)
        if holder and holder != owner and (_utc(until) or now) > now and not _dead_here(holder):
            raise _busy(job_id, holder, since, until)
        held = ReviewJob.locked_by.is_(None) if holder is None else ReviewJob.locked_by == holder
        taken = s.execute(update(ReviewJob).where(ReviewJob.id == job_id, held)
                          .values(locked_by=owner, locked_at=now,
                                  lease_until=now + timedelta(seconds=lease_s))).rowcount
    if taken != 1:
        with store.session() as s:
            holder, since, until = s.execute(select(ReviewJob.locked_by, ReviewJob.locked_at,
                                                    ReviewJob.lease_until).where(ReviewJob.id == job_id)).one()
        raise _busy(job_id, holder or "unknown:?", since, until)
    return Lease(job_id, owner, lease_s)


def _hold(s: Session, lease: Lease | None) -> None:
    """Renew `lease` as the first write of session `s`'s transaction, or a ReviewError if another run has
    taken the job: the UPDATE locks the job row (PostgreSQL) or the database (SQLite) until the transaction
    commits, so the job cannot change hands between this check and the writes after it."""
    if lease is None:
        return
    n = s.execute(update(ReviewJob).where(ReviewJob.id == lease.job_id, ReviewJob.locked_by == lease.owner)
                  .values(lease_until=_db_now(s) + timedelta(seconds=lease.seconds))).rowcount
    if n != 1:
        raise ReviewError(f"job {lease.job_id}: another run took the job over (this run held its lease past "
                          f"{lease.seconds:.0f}s without progress); stopping")


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float = LEASE_S) -> None:
    """Extend this run's lease (after each batch); a ReviewError if another run has taken the job since."""
    with store.session() as s:
        _hold(s, Lease(job_id, owner, lease_s))


def release_lease(store: Store, job_id: int, owner: str) -> None:
    with store.session() as s:
        s.execute(update(ReviewJob).where(ReviewJob.id == job_id, ReviewJob.locked_by == owner)
                  .values(locked_by=None, locked_at=None, lease_until=None))
