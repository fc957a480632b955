"""What binds a built index folder to the case store it was built from, and the check made when it is opened.

FAISS ids are case-store row ids. Re-ingest the store, or open the index with another one, and those ids can
name other patients' ECGs. So a build records (source, external_id) for every indexed id in `cases.json`
(columnar, compact: ~30 MB and well under a second to read for 10^6 cases), and the folder's `manifest.json`
vouches for that file (count + sha256). `check_store` compares it with the store in one query of
(id, source, external_id) over the indexed id range and refuses a store that disagrees. Indexes built before
the binding existed open with a warning to rebuild them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
from sqlalchemy import select

from rag_ecg.data.store import Case, Store
from rag_ecg.errors import ArtifactError
from rag_ecg.io import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the folder's manifest: written last, so its presence means "finished"
CASES = "cases.json"
CASES_FORMAT = "rag-ecg-index-cases"
REBUILD = "rebuild it with `python cli.py build-index`"


class IndexStoreMismatchError(ArtifactError):
    """An index opened with another case store than the one it was built from (or a broken case list)."""


def write_cases(folder: str | Path, cases: Iterable[tuple[int, str, str]]) -> dict:
    """Write `cases.json` — (id, source, external_id) of every indexed case — atomically; returns the entry
    the folder's manifest keeps under "cases" (file, count, sha256)."""
    rows = sorted((int(i), str(src), str(ext)) for i, src, ext in cases)
    sources = sorted({src for _, src, _ in rows})
    code = {s: j for j, s in enumerate(sources)}
    doc = {"format": CASES_FORMAT, "ids": [i for i, _, _ in rows], "sources": sources,
           "source": [code[src] for _, src, _ in rows], "external_ids": [ext for _, _, ext in rows]}
    data = json.dumps(doc, separators=(",", ":")).encode()
    atomic_write(Path(folder) / CASES, data)
    return {"file": CASES, "count": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def read_cases(index_dir: str | Path, entry: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """(ids, sources, external_ids) of `cases.json`, checked against the manifest's entry."""
    path = Path(index_dir) / str(entry.get("file") or CASES)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexStoreMismatchError(f"{path}: case list missing or unreadable ({e.strerror or e}); {REBUILD}") from e
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise IndexStoreMismatchError(f"{path}: does not match its index manifest (corrupt or replaced); {REBUILD}")
    try:
        doc = json.loads(data)
        ids = np.asarray(doc["ids"], dtype=np.int64)
        names = doc["sources"]
        sources = [names[j] for j in doc["source"]]
        ext = [str(x) for x in doc["external_ids"]]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise IndexStoreMismatchError(f"{path}: not an index case list ({e}); {REBUILD}") from e
    if doc.get("format") != CASES_FORMAT or not len(ids) == len(sources) == len(ext) == entry.get("count"):
        raise IndexStoreMismatchError(f"{path}: not an index case list of {entry.get('count')} cases; {REBUILD}")
    return ids, sources, ext


def check_store(index_dir: str | Path, store: Store, manifest: dict | None = None,
                ids: np.ndarray | None = None) -> None:
    """Refuse (IndexStoreMismatchError, one line) a store whose cases are not the ones the index was built from.

    `manifest`: the folder's manifest (read from `index_dir` when None); `ids`: the ids its FAISS indexes hold
    (checked to be exactly the recorded cases). An index without a case list (built before it was recorded)
    is let through with a warning."""
    index_dir = Path(index_dir)
    if manifest is None:
        manifest = json.loads((index_dir / MANIFEST).read_text())
    entry = manifest.get("cases")
    if not entry:
        log.warning("%s: built before indexes recorded which cases they hold, so it cannot be checked against "
                    "%r (results may name other patients' ECGs if the store was re-ingested); %s",
                    index_dir, store, REBUILD)
        return
    rec_ids, sources, ext = read_cases(index_dir, entry)
    if ids is not None and not np.array_equal(np.unique(np.asarray(ids, dtype=np.int64)), np.unique(rec_ids)):
        raise IndexStoreMismatchError(f"{index_dir}: its FAISS indexes do not hold the cases its {CASES} lists "
                                      f"(files from different builds?); {REBUILD}")
    if not len(rec_ids):
        return
    lo, hi = int(rec_ids.min()), int(rec_ids.max())
    with store.session() as s:
        here = {int(i): (src, x) for i, src, x in
                s.execute(select(Case.id, Case.source, Case.external_id).where(Case.id >= lo, Case.id <= hi))}
    for cid, src, x in zip(rec_ids.tolist(), sources, ext):
        got = here.get(cid)
        if got is None or got[0] != src or str(got[1]) != x:
            now = f"{got[0]}:{got[1]}" if got else "missing"
            raise IndexStoreMismatchError(
                f"{index_dir}: built from another case store than {store!r} (case {cid} is {src}:{x} there, "
                f"{now} here); {REBUILD} or pass the --db it was built from")
