"""Each case's searchable text, kept in a full-text table beside `cases`: SQLite FTS5 or a PostgreSQL tsvector.

Why in the store: text search then needs no server of its own and sees exactly the cases the store holds.
A case's document has three fields, ranked in this order of weight:
  codes       its SCP-ECG statements as single tokens (`LAO/LAE` -> `scplaolae`): a recognised statement matches
  statements  the English descriptions of those statements (PTB-XL reports are German; LUDB's are English)
  report      the free-text report as written (German queries still find German reports)
Rows are written in the transaction that writes their cases (`install` hooks the store's sessions), and
`sync` catches up whatever else changed: a store made before this table, cases written without the ORM
(each row's stamp is its case's `updated_at` and a fingerprint of the statement descriptions it was made
with, so re-ingested descriptions make every row stale).
Every write is idempotent: a row is replaced whole, never appended.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping

from sqlalchemy import bindparam, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)

TABLE = "case_text"
CODE_PREFIX = "scp"
PG_WEIGHTS = {"codes": "A", "statements": "B", "report": "C"}  # ts_rank weights follow (see search.lexical)
_SQLITE_DDL = (f"CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(codes, statements, report, stamp UNINDEXED, "
               "tokenize = 'porter unicode61 remove_diacritics 2')",)
_PG_DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (case_id INTEGER PRIMARY KEY, stamp TEXT, doc TSVECTOR NOT NULL)",
           f"CREATE INDEX IF NOT EXISTS ix_{TABLE}_doc ON {TABLE} USING GIN (doc)")


def code_token(code: str) -> str:
    """An SCP code as one lower-case token every tokenizer keeps whole: `LAO/LAE` -> `scplaolae`."""
    return CODE_PREFIX + re.sub(r"[^0-9a-z]", "", code.lower())


def dialect(conn: Connection | Engine) -> str:
    return conn.dialect.name


def create(engine: Engine) -> bool:
    """Create the full-text table if missing; False (logged) where the database cannot hold one."""
    ddl = _SQLITE_DDL if dialect(engine) == "sqlite" else _PG_DDL if dialect(engine) == "postgresql" else ()
    if not ddl:
        logger.info("%s: no full-text table on this database; text search ranks by the text tower only",
                    dialect(engine))
        return False
    if exists(engine):  # the usual case: every open of a store comes here, so no DDL (and no lock) then
        return True
    try:
        with engine.begin() as conn:
            for stmt in ddl:
                conn.execute(text(stmt))
    except DBAPIError as exc:  # another process created it at the same moment, or no FTS5 in this SQLite
        if not exists(engine):
            logger.warning("full-text table not created (%s): text search ranks by the text tower only",
                           str(exc).splitlines()[0])
            return False
    return True


def exists(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SELECT 1 FROM {TABLE} LIMIT 1"))
    except DBAPIError:
        return False
    return True


def install(engine: Engine, sessions) -> None:
    """Create the table and keep it in step with every ORM flush of `cases` through `sessions`."""
    if create(engine):
        event.listen(sessions, "after_flush", _after_flush)


def _after_flush(session, _context) -> None:
    changed = {o.id for o in list(session.new) + list(session.dirty) if _is_case(o) and o.id is not None}
    gone = {o.id for o in session.deleted if _is_case(o) and o.id is not None}
    if changed or gone:
        conn = session.connection()
        write(conn, changed - gone, descriptions(conn))
        delete(conn, gone)


def _is_case(obj) -> bool:
    return getattr(obj, "__tablename__", None) == "cases"


# ---------------------------------------------------------------------------------------------- documents


def descriptions(conn: Connection) -> dict[str, str]:
    return dict(conn.execute(text("SELECT code, description FROM scp_statements")).all())


def fingerprint(desc: Mapping[str, str]) -> str:
    return hashlib.sha1(json.dumps(sorted(desc.items())).encode()).hexdigest()[:16]


def document(report: str | None, codes: Mapping[str, float] | None, desc: Mapping[str, str]) -> dict[str, str]:
    """The three fields of a case's document (codes in likelihood order; a code without description is
    still searchable by its token)."""
    ordered = sorted((codes or {}).items(), key=lambda kv: (-float(kv[1] or 0.0), kv[0]))
    return {"codes": " ".join(code_token(c) for c, _ in ordered),
            "statements": ". ".join(desc[c] for c, _ in ordered if desc.get(c)),
            "report": " ".join((report or "").split())}


def _json(value) -> dict:
    return json.loads(value) if isinstance(value, (str, bytes)) else dict(value or {})


def write(conn: Connection, ids: Iterable[int], desc: Mapping[str, str]) -> int:
    """(Re)write the rows of these case ids from the cases table as it stands in this transaction."""
    ids = sorted(set(ids))
    done = 0
    for lo in range(0, len(ids), 500):
        chunk = ids[lo:lo + 500]
        rows = conn.execute(text("SELECT id, report, codes, updated_at FROM cases WHERE id IN :ids")
                            .bindparams(_expanding("ids")), {"ids": chunk}).all()
        fp = fingerprint(desc)
        params = [{"id": r[0], "stamp": _stamp(r[3], fp), **document(r[1], _json(r[2]), desc)} for r in rows]
        if not params:
            continue
        if dialect(conn) == "sqlite":
            conn.execute(text(f"DELETE FROM {TABLE} WHERE rowid IN :ids").bindparams(_expanding("ids")),
                         {"ids": [p["id"] for p in params]})
            conn.execute(text(f"INSERT INTO {TABLE} (rowid, codes, statements, report, stamp) "
                              "VALUES (:id, :codes, :statements, :report, :stamp)"), params)
        else:
            doc = " || ".join(f"setweight(to_tsvector('{'simple' if f == 'codes' else 'english'}', :{f}), '{w}')"
                              for f, w in PG_WEIGHTS.items())
            conn.execute(text(f"INSERT INTO {TABLE} (case_id, stamp, doc) VALUES (:id, :stamp, {doc}) "
                              "ON CONFLICT (case_id) DO UPDATE SET stamp = EXCLUDED.stamp, doc = EXCLUDED.doc"),
                         params)
        done += len(params)
    return done


def delete(conn: Connection, ids: Iterable[int]) -> None:
    ids = sorted(set(ids))
    if ids:
        key = "rowid" if dialect(conn) == "sqlite" else "case_id"
        conn.execute(text(f"DELETE FROM {TABLE} WHERE {key} IN :ids").bindparams(_expanding("ids")), {"ids": ids})


def sync(engine: Engine) -> int:
    """Bring every row up to date with `cases` and the statement descriptions; returns rows rewritten."""
    if not exists(engine) and not create(engine):
        return 0
    key = "rowid" if dialect(engine) == "sqlite" else "case_id"
    with engine.begin() as conn:
        desc = descriptions(conn)
        fp = fingerprint(desc)
        cases = {int(i): _stamp(u, fp) for i, u in conn.execute(text("SELECT id, updated_at FROM cases"))}
        have = {int(i): s for i, s in conn.execute(text(f"SELECT {key}, stamp FROM {TABLE}"))}
        delete(conn, set(have) - set(cases))
        n = write(conn, {i for i, s in cases.items() if have.get(i) != s}, desc)
    if n:
        logger.info("full-text rows of %d case(s) written", n)
    return n


def _stamp(updated_at, fp: str) -> str:
    return f"{'' if updated_at is None else updated_at}#{fp[:16]}"


def _expanding(name: str):
    return bindparam(name, expanding=True)
