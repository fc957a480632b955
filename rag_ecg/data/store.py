"""The case store: SQLAlchemy 2.x models and a session factory (SQLite by default, any URL by config).

One `Case` row per reference ECG; signals stay in their WFDB files (`signal_path`) so the store is small
and the original data stays the single source of truth. Later layers add their own tables here
(embeddings' row ids live in the FAISS index manifest keyed by `Case.id`; review jobs and results).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, func, inspect, select)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rag_ecg import paths
from rag_ecg.data import case_text
from rag_ecg.data.labels import ScpStatement
from rag_ecg.data.records import ECGRecord, read_ludb, read_wfdb
from rag_ecg.errors import BackendError, InputError
from rag_ecg.redact import mask_url


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Case(Base):
    """A reference ECG with its report and labels; `id` is what retrieval returns and reports cite."""

    __tablename__ = "cases"
    __table_args__ = (UniqueConstraint("source", "external_id", name="uq_case_source_external"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32), index=True)  # ptbxl | ludb | wfdb | ...
    external_id: Mapped[str] = mapped_column(String(128))  # id within the source (ecg_id, LUDB number)
    patient_id: Mapped[str | None] = mapped_column(String(128), index=True)
    age: Mapped[float | None] = mapped_column(Float)
    sex: Mapped[str | None] = mapped_column(String(1))
    report: Mapped[str] = mapped_column(Text, default="")
    codes: Mapped[dict] = mapped_column(JSON, default=dict)  # SCP-ECG code -> likelihood 0-100
    labels: Mapped[list] = mapped_column(JSON, default=list)  # diagnostic superclasses
    fold: Mapped[int | None] = mapped_column(Integer, index=True)
    split: Mapped[str | None] = mapped_column(String(16), index=True)  # train | val | test
    signal_path: Mapped[str] = mapped_column(Text)  # WFDB record path without extension
    fs: Mapped[float] = mapped_column(Float)
    n_samples: Mapped[int] = mapped_column(Integer)
    units: Mapped[str] = mapped_column(String(8))
    image_path: Mapped[str | None] = mapped_column(Text)  # a rendered page, when one was kept
    extra: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class ScpStatementRow(Base):
    """SCP-ECG statements (code -> English text, class), so reports and evidence speak English."""

    __tablename__ = "scp_statements"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    diagnostic_class: Mapped[str | None] = mapped_column(String(8))
    diagnostic_subclass: Mapped[str | None] = mapped_column(String(16))
    kinds: Mapped[list] = mapped_column(JSON, default=list)


class IngestRun(Base):
    """One ingest invocation: what it saw, stored, and skipped (with reasons), for the audit trail."""

    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inserted: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)  # reasons are IngestSkip rows


class IngestSkip(Base):
    """A record an ingest run could not use, kept so nobody has to re-read the log."""

    __tablename__ = "ingest_skips"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("ingest_runs.id"), index=True)
    record: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)


class ReviewJob(Base):
    """A batch chart review: its input and settings; re-running the same command finds the same job."""

    __tablename__ = "review_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # hash of input + settings: resume finds it
    input: Mapped[str] = mapped_column(Text)
    out_dir: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # backend, index, k, engine, ...
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the lease of the run processing the job ("host:pid:token"), taken and renewed in one UPDATE each
    locked_by: Mapped[str | None] = mapped_column(String(255))
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ReviewItem(Base):
    """One chart of a review job; `done`/`error` rows are never redone, so a killed batch resumes."""

    __tablename__ = "review_items"
    __table_args__ = (UniqueConstraint("job_id", "chart_key", name="uq_review_item_chart"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("review_jobs.id"), index=True)
    chart_key: Mapped[str] = mapped_column(Text)  # stable id of the chart within the input (relative path)
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|done|error
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)  # stage -> seconds
    report: Mapped[dict | None] = mapped_column(JSON)  # Report.to_dict()
    neighbours: Mapped[list | None] = mapped_column(JSON)  # [{"case_id": .., "score": ..}, ...]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fingerprint: Mapped[str | None] = mapped_column(String(255))  # the file's identity: replaced -> redone


def default_db_url() -> str:
    """`RAG_ECG_DB` if set, else a SQLite file in the project's data directory."""
    env = os.environ.get("RAG_ECG_DB")
    if env:
        return env
    return f"sqlite:///{paths.data_dir() / 'rag_ecg.db'}"


class Store:
    """An engine + session factory over one database; tables are created on open."""

    def __init__(self, url: str, echo: bool = False):
        self.url = url
        self.engine: Engine = _make_engine(url, echo)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        case_text.install(self.engine, self._sessions)  # full-text rows written with their cases (text search)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def count(self, source: str | None = None) -> int:
        with self.session() as s:
            q = select(func.count(Case.id))
            if source:
                q = q.where(Case.source == source)
            return int(s.scalar(q) or 0)

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Store({self.safe_url})"

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden: what may be printed, logged or written."""
        return mask_url(self.url)


# Columns added after a table was first released: a database made before gets them on open (all nullable,
# so ALTER TABLE ... ADD COLUMN is safe on SQLite and PostgreSQL and leaves existing rows as they were).
ADDED_COLUMNS = {"review_jobs": ("locked_by", "locked_at", "lease_until"), "review_items": ("fingerprint",)}


def _add_missing_columns(engine: Engine) -> None:
    for table, names in ADDED_COLUMNS.items():
        have = {c["name"] for c in inspect(engine).get_columns(table)}
        for name in names:
            if name in have:
                continue
            col = Base.metadata.tables[table].c[name]
            ddl = f"ALTER TABLE {table} ADD COLUMN {name} {col.type.compile(dialect=engine.dialect)}"
            try:
                with engine.begin() as conn:
                    conn.execute(sql_text(ddl))
            except DBAPIError:  # another process added it at the same moment
                if name not in {c["name"] for c in inspect(engine).get_columns(table)}:
                    raise


def _make_engine(url: str, echo: bool) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _):  # WAL: readers never block the writer (batch review)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def open_store(url: str | None = None, echo: bool = False) -> Store:
    """Open (and create if needed) the store at `url` (default: `default_db_url()`).

    A URL that cannot work (malformed, unknown dialect or driver) or a SQLite file that cannot be opened is
    an InputError; a database server that refuses or cannot be reached is a BackendError. Either way one
    line naming the URL (password hidden) and the cause.
    """
    url = url or default_db_url()
    try:
        return Store(url, echo=echo)
    except Exception as exc:  # bad URL, missing driver, unreachable server
        raise _open_error(url, exc) from exc


def _open_error(url: str, exc: Exception) -> InputError | BackendError:
    shown = mask_url(url)
    try:
        local = make_url(url).get_backend_name() == "sqlite"
    except ArgumentError:
        local = False
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    message = f"{shown}: cannot open case store ({first})"
    if local or isinstance(exc, (ArgumentError, ImportError)):
        return InputError(message)
    return BackendError(message)


def summary(store: Store) -> dict:
    """Counts per source, per (source, superclass) and per split: what `ingest` prints."""
    with store.session() as s:
        rows = s.execute(select(Case.source, Case.labels, Case.split)).all()
    out: dict = {"total": len(rows), "by_source": {}, "by_label": {}, "by_split": {}}
    for source, labels, split in rows:
        out["by_source"][source] = out["by_source"].get(source, 0) + 1
        per = out["by_label"].setdefault(source, {})
        for lab in labels or ["(none)"]:
            per[lab] = per.get(lab, 0) + 1
        key = f"{source}:{split or '-'}"
        out["by_split"][key] = out["by_split"].get(key, 0) + 1
    return out


def scp_descriptions(session: Session) -> dict[str, str]:
    return dict(session.execute(select(ScpStatementRow.code, ScpStatementRow.description)).all())


def upsert_scp_statements(session: Session, statements: dict[str, ScpStatement]) -> None:
    existing = {r.code: r for r in session.scalars(select(ScpStatementRow))}
    for st in statements.values():
        row = existing.get(st.code) or ScpStatementRow(code=st.code)
        row.description, row.diagnostic_class = st.description, st.diagnostic_class
        row.diagnostic_subclass, row.kinds = st.diagnostic_subclass, list(st.kinds)
        session.add(row)


def load_case_record(case: Case) -> ECGRecord:
    """Read a case's signal back from its WFDB file, with the store's metadata attached."""
    if case.source == "ludb":
        rec = read_ludb(case.signal_path, record_id=f"{case.source}:{case.external_id}")
    else:
        rec = read_wfdb(case.signal_path, record_id=f"{case.source}:{case.external_id}", source=case.source)
    return replace(rec, patient_id=case.patient_id, age=case.age, sex=case.sex, report=case.report,
                   codes=dict(case.codes or {}), labels=list(case.labels or []), fold=case.fold)


def case_from_record(rec: ECGRecord, external_id: str) -> dict:
    """Column values for a case built from a validated record."""
    return dict(
        source=rec.source, external_id=external_id, patient_id=rec.patient_id, age=rec.age, sex=rec.sex,
        report=rec.report, codes=dict(rec.codes), labels=list(rec.labels), fold=rec.fold,
        split=split_for_fold(rec.fold), signal_path=str(rec.path), fs=float(rec.fs),
        n_samples=int(rec.signal.shape[0]), units=rec.units,
        extra={k: v for k, v in rec.extra.items() if k != "comments"},
    )


def case_changes(case: Case, values: dict) -> dict:
    """The part of `values` (from `case_from_record`) that differs from what `case` holds.

    Compared as the store keeps them, so an unchanged record yields {} and a re-ingest writes nothing:
    floats by value (500 == 500.0), JSON columns as plain JSON (tuples, numpy scalars, key order do not
    count), file paths by the file they name.
    """
    columns = Case.__table__.columns
    return {k: v for k, v in values.items() if not _same_value(columns[k].type, k, getattr(case, k), v)}


_PATH_COLUMNS = {"signal_path", "image_path"}


def _same_value(kind, key: str, old, new) -> bool:
    if old is None or new is None:
        return old is None and new is None
    if isinstance(kind, Float):
        a, b = float(old), float(new)
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(kind, JSON):
        return _plain_json(old) == _plain_json(new)
    if key in _PATH_COLUMNS:
        return str(old) == str(new) or Path(str(old)).resolve() == Path(str(new)).resolve()
    if isinstance(kind, Integer):
        return int(old) == int(new)
    return old == new


def _plain_json(value):
    """`value` as the JSON column will read it back (lists for tuples, floats for numpy scalars)."""
    text = json.dumps(value, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return json.loads(text)


def split_for_fold(fold: int | None) -> str | None:
    """PTB-XL's recommended split: folds 1-8 train, 9 validation, 10 test."""
    if fold is None:
        return None
    return "train" if fold <= 8 else ("val" if fold == 9 else "test")
