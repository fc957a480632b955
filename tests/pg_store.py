"""Real PostgreSQL stores for tests: a copy of a store's rows with their ids (a review index names cases by
id), and the store's URL with its password spelled out percent-encoded byte by byte (the same login, but a
string no file holds by chance) with a scan for leaks of it: that string, or `:<password>@`.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert, make_url, select, text

from rag_ecg.data.store import Base, open_store


def copy_rows(src_url: str, dst_url: str) -> None:
    """Every row of one store into another, ids kept (the review index names cases by id)."""
    src, dst = open_store(src_url), open_store(dst_url)
    with src.engine.connect() as a, dst.engine.begin() as b:
        for table in Base.metadata.sorted_tables:
            rows = [dict(r) for r in a.execute(select(table)).mappings()]
            if rows:
                b.execute(insert(table), rows)
            if dst.engine.dialect.name == "postgresql" and "id" in table.c and rows:  # ids given: move on
                b.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                               f"(SELECT MAX(id) FROM {table.name}))"))
    src.dispose()
    dst.dispose()


def spelled_out(url: str) -> tuple[str, list[bytes]]:
    """(`url` with its password percent-encoded byte by byte, what a leak of it would look like)."""
    u = make_url(url)
    encoded = "".join(f"%{b:02X}" for b in u.password.encode())
    return (f"{u.drivername}://{u.username}:{encoded}@{u.host}:{u.port}/{u.database}",
            [encoded.lower().encode(), f":{u.password}@".lower().encode()])


def leaks(needles: list[bytes], *where: Path, extra: str = "") -> list[str]:
    """Files under `where` (and the string `extra`) holding a needle, compared case-insensitively."""
    found = [str(p) for root in where for p in sorted(root.rglob("*")) if p.is_file()
             and any(n in p.read_bytes().lower() for n in needles)]
    return found + (["<extra>"] if any(n in extra.lower().encode() for n in needles) else [])
