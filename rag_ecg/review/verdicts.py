"""Reviewers' verdicts (agree / disagree / comment per chart): the page's CSV in, durable rows in the store out.

Why a CSV: the review page is a static file a reviewer may open offline; it keeps decisions in the browser
(localStorage) and exports them as a CSV that names its job (key) and each chart (item id + key).
`import_verdicts` stores them with the job, one row per chart: re-importing the same file changes nothing,
a newer decision replaces an older one, and a file for a job this store does not hold, or naming charts that
are not that job's, is refused whole (nothing stored) with one line saying why.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from rag_ecg.data.store import ReviewItem, ReviewJob, Store
from rag_ecg.errors import InputError
from rag_ecg.review.config import ReviewConfig
from rag_ecg.review.jobs import ReviewVerdict, ensure_verdict_table
from rag_ecg.review.outputs import write_outputs

VERDICTS = ("agree", "disagree")
CSV_COLUMNS = ("job_key", "job_id", "chart_id", "chart", "verdict", "comment", "decided_at")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # the page writes such a cell with a leading ' (spreadsheets)


class VerdictImportError(InputError):
    """The verdict CSV cannot be imported into this store (wrong job, unknown charts, unreadable)."""


@dataclass
class ImportResult:
    job_id: int
    out_dir: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0  # the same decision, or an older one than the store holds


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _parse_time(text: str, where: str) -> datetime | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise VerdictImportError(f"{where}: decided_at {text!r} is not an ISO time") from None


def _cell(text: str | None) -> str:
    """A cell as the page meant it: the leading ' it adds before formula-like text removed."""
    text = text or ""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def read_csv(path: str | Path) -> list[dict]:
    """The CSV's rows (checked: its columns, one job, known verdict words, integer chart ids)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise VerdictImportError(f"{path}: unreadable verdict CSV ({exc})") from None
    try:
        reader = csv.DictReader(io.StringIO(text))
        cols = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = cols
        rows = list(reader)
    except csv.Error as exc:
        raise VerdictImportError(f"{path}: unreadable verdict CSV ({exc})") from None
    missing = [c for c in ("job_key", "chart_id", "verdict", "comment") if c not in cols]
    if missing:
        raise VerdictImportError(f"{path}: not a verdict CSV from a review page (missing column(s) "
                                 f"{', '.join(missing)}; has {', '.join(cols) or 'none'})")
    out = []
    for n, row in enumerate(rows, start=2):
        where = f"{path}:{n}"
        cid, verdict = (row.get("chart_id") or "").strip(), _cell(row.get("verdict")).strip().lower()
        if not cid.isdigit():
            raise VerdictImportError(f"{where}: chart_id {cid!r} is not a chart id")
        if verdict not in VERDICTS + ("",):
            raise VerdictImportError(f"{where}: verdict {verdict!r}: use agree, disagree or leave it empty")
        out.append({"job_key": (row.get("job_key") or "").strip(), "item_id": int(cid),
                    "chart": _cell(row.get("chart")), "verdict": verdict or None,
                    "comment": _cell(row.get("comment")), "decided_at": _parse_time(row.get("decided_at"), where)})
    keys = sorted({r["job_key"] for r in out})
    if len(keys) > 1:
        raise VerdictImportError(f"{path}: rows of {len(keys)} jobs ({', '.join(k[:12] for k in keys)}): export "
                                 f"one page's verdicts per file")
    if not out:
        raise VerdictImportError(f"{path}: no verdicts in the file")
    return out


def import_verdicts(store: Store, path: str | Path) -> ImportResult:
    """Store the CSV's verdicts with their job, all or nothing (a VerdictImportError says why not)."""
    rows = read_csv(path)
    ensure_verdict_table(store)
    key = rows[0]["job_key"]
    now = datetime.now(timezone.utc)
    with store.session() as s:
        job = s.scalar(select(ReviewJob).where(ReviewJob.key == key))
        if job is None:
            raise VerdictImportError(f"{path}: its verdicts are for review job {key[:12] or '(none)'}, which "
                                     f"{store.safe_url} does not hold: import it with the --db of that review")
        ids = [r["item_id"] for r in rows]
        items = {i: k for i, k in s.execute(select(ReviewItem.id, ReviewItem.chart_key)
                                            .where(ReviewItem.job_id == job.id, ReviewItem.id.in_(ids)))}
        unknown = [r for r in rows if r["item_id"] not in items or (r["chart"] and r["chart"] != items[r["item_id"]])]
        if unknown:
            shown = ", ".join(f"{r['item_id']} ({r['chart'] or '?'})" for r in unknown[:5])
            raise VerdictImportError(f"{path}: {len(unknown)} chart id(s) are not charts of review job {job.id} "
                                     f"({key[:12]}): {shown}{' …' if len(unknown) > 5 else ''}")
        have = {v.item_id: v for v in s.scalars(select(ReviewVerdict).where(ReviewVerdict.item_id.in_(ids)))}
        res = ImportResult(job.id, job.out_dir)
        for r in rows:
            old = have.get(r["item_id"])
            if old is None:
                v = ReviewVerdict(job_id=job.id, item_id=r["item_id"], chart_key=items[r["item_id"]],
                                  verdict=r["verdict"], comment=r["comment"], decided_at=r["decided_at"],
                                  imported_at=now)
                s.add(v)
                have[r["item_id"]] = v
                res.added += 1
                continue
            same = (old.verdict, old.comment or "") == (r["verdict"], r["comment"])
            older = old.decided_at is not None and (r["decided_at"] is None or _utc(old.decided_at) > r["decided_at"])
            if same or older:
                res.unchanged += 1
                continue
            old.verdict, old.comment, old.decided_at, old.imported_at = (r["verdict"], r["comment"],
                                                                         r["decided_at"], now)
            res.updated += 1
    return res


def rerender_page(store: Store, job_id: int) -> Path | None:
    """Write the job's outputs again (its page then shows the stored verdicts); None when its folder is gone."""
    with store.session() as s:
        job = s.get(ReviewJob, job_id)
        out_dir, settings = Path(job.out_dir), dict(job.settings or {})
    if not out_dir.is_dir():
        return None
    known = set(ReviewConfig.__dataclass_fields__)
    cfg = ReviewConfig.from_dict({k: v for k, v in (settings.get("review") or {}).items() if k in known})
    return write_outputs(store, job_id, out_dir, cfg)["html"]
