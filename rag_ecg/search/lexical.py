"""Lexical search over cases' text (`rag_ecg.data.case_text`): clinical shorthand expanded, SCP statements
recognised, ranked by BM25 (SQLite FTS5) or IDF-weighted ts_rank (PostgreSQL).

Why: the CLIP text tower alone ranks "inferior myocardial infarction" poorly (text->case R@1 0.08); words are
what a clinician types, and every PTB-XL case carries English statement descriptions to match them against.
A query is read in three steps:
  1. shorthand -> words: `MI` -> myocardial infarction, `RBBB` -> right bundle branch block, and any SCP code
     typed as such (`LVH`, `1AVB`, `PVCs`) -> that statement; a few words bring a companion (`tachy` +
     tachycardia, `ischemia` + ischemic) because stems differ and FTS5 stems prefix queries too;
  2. statements named in full are recognised (the longest wins: "voltage criteria (QRS) for left ventricular
     hypertrophy" names VCLVH, not also LVH) and searched as codes, which weigh most;
  3. the words are OR-ed too (cases without codes, such as LUDB's, are found by them), so a case matching more
     and rarer words ranks higher.
`recognise=False` searches the typed words only (the benchmark's ablation).
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from sqlalchemy import text

from rag_ecg.data import case_text
from rag_ecg.data.store import Store, scp_descriptions

# common clinical shorthand that is not itself an SCP code (codes are recognised from the store's vocabulary)
SHORTHAND: dict[str, str] = {
    "mi": "myocardial infarction", "stemi": "ST elevation myocardial infarction", "nstemi": "non-ST elevation myocardial infarction", "af": "atrial fibrillation",
    "afl": "atrial flutter", "rbbb": "complete right bundle branch block", "lbbb": "complete left bundle branch block",
    "bbb": "bundle branch block", "avb": "AV block", "lad": "left axis deviation", "rad": "right axis deviation",
    "lae": "left atrial enlargement", "rae": "right atrial enlargement", "lah": "left anterior fascicular block",
    "lahb": "left anterior fascicular block", "lphb": "left posterior fascicular block",
    "vt": "ventricular tachycardia", "svt": "supraventricular tachycardia", "nsr": "normal sinus rhythm",
    "twi": "inverted T-waves", "lv": "left ventricular",
    "rv": "right ventricular", "inf": "inferior", "ant": "anterior", "lat": "lateral", "ecg": "ECG",
}
# words that find more with a companion: clinical truncations, British spelling, the statements' own word forms
SYNONYMS: dict[str, str] = {
    "tachy": "tachycardia", "brady": "bradycardia", "ischemia": "ischemic", "ischaemia": "ischemic",
    "ischaemic": "ischemic", "inversion": "inverted", "inversions": "inverted", "digoxin": "digitalis",
    "hemiblock": "fascicular block", "infarct": "infarction", "elevations": "elevation",
}
STOPWORDS = frozenset("a an and are as at by for from in is of on or the to with without ecg ekg".split())
BM25_WEIGHTS = (10.0, 2.0, 1.0, 0.0)  # codes, statements, report, stamp (SQLite FTS5 column order)
PG_RANK_WEIGHTS = "'{0.0, 0.1, 0.2, 1.0}'::float4[]"  # ts_rank's {D, C, B, A}: report C, statements B, codes A
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class LexicalQuery:
    """What a query asks for: recognised statements (as codes) and the remaining search words."""

    codes: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.codes and not self.words


def _norm(word: str) -> str:
    return word.lower()


def _content(words: list[str]) -> list[str]:
    return [w for w in words if w not in STOPWORDS]


def parse_query(query: str, descriptions: Mapping[str, str], recognise: bool = True) -> LexicalQuery:
    """Expand shorthand and codes, recognise statements named in full, keep the rest as words."""
    by_token = {case_text.code_token(c)[len(case_text.CODE_PREFIX):]: c for c in descriptions}
    words: list[str] = []
    codes: list[str] = []
    for raw in _WORD.findall(query or ""):
        w = _norm(raw)
        code = by_token.get(w) or (w.endswith("s") and by_token.get(w[:-1])) if recognise and len(w) >= 2 else None
        if code:  # an SCP code typed as such: the statement, and its words for cases without codes (LUDB)
            codes.append(code)
            words += [_norm(x) for x in _WORD.findall(descriptions[code])]
        elif w in SHORTHAND and recognise:
            expansion = [_norm(x) for x in _WORD.findall(SHORTHAND[w])]
            if expansion[0] == "complete" and words and words[-1] in ("incomplete", "complete"):
                expansion = expansion[1:]  # "incomplete RBBB" is IRBBB; a bare "RBBB" means the complete one
            words += expansion
        else:
            words.append(w)
            if recognise and w in SYNONYMS:
                words += SYNONYMS[w].split()
    words = _content(words)
    if recognise:
        codes += _recognise(words, descriptions)
    return LexicalQuery(codes=list(dict.fromkeys(codes)), words=list(dict.fromkeys(words)))


def _recognise(words: list[str], descriptions: Mapping[str, str]) -> list[str]:
    """Statements whose whole description occurs in the query words, longest first, without overlaps."""
    spans = []
    for code, desc in descriptions.items():
        d = _content([_norm(x) for x in _WORD.findall(desc)])
        n = len(d)
        if not n:
            continue
        for i in range(len(words) - n + 1):
            if words[i:i + n] == d:
                spans.append((n, i, code))
    taken: set[int] = set()
    found = []
    for n, i, code in sorted(spans, key=lambda t: (-t[0], t[1], t[2])):
        span = set(range(i, i + n))
        if span & taken:
            continue
        taken |= span
        found.append(code)
    return found


class LexicalSearch:
    """Ranked case ids for a text query, from the store's full-text table (brought up to date on open)."""

    def __init__(self, store: Store):
        self.store = store
        self.dialect = store.engine.dialect.name
        # False on a database without full-text search (another dialect, a SQLite built without FTS5)
        self.available = case_text.create(store.engine)
        if self.available:
            case_text.sync(store.engine)  # lazily built for a store made before the table; catches up changes
        with store.session() as s:
            self.descriptions = scp_descriptions(s)

    def parse(self, query: str, recognise: bool = True) -> LexicalQuery:
        return parse_query(query, self.descriptions, recognise)

    def search(self, query: str, limit: int = 100, allowed: Collection[int] | None = None,
               recognise: bool = True) -> list[tuple[int, float]]:
        """Best first (case id, score > 0); `allowed` keeps only those ids (e.g. an index's library)."""
        q = self.parse(query, recognise)
        if q.empty or not self.available:
            return []
        with self.store.engine.connect() as conn:
            rows = self._sqlite(conn, q) if self.dialect == "sqlite" else self._postgres(conn, q)
        out = []
        for cid, score in rows:
            if allowed is None or cid in allowed:
                out.append((int(cid), float(score)))
                if len(out) >= limit:
                    break
        return out

    @staticmethod
    def _sqlite(conn, q: LexicalQuery) -> list:
        terms = [case_text.code_token(c) for c in q.codes] + q.words
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        w = ", ".join(map(str, BM25_WEIGHTS))
        return conn.execute(text(f"SELECT rowid, -bm25({case_text.TABLE}, {w}) AS s FROM {case_text.TABLE} "
                                 f"WHERE {case_text.TABLE} MATCH :m ORDER BY s DESC, rowid"), {"m": match}).all()

    @staticmethod
    def _postgres(conn, q: LexicalQuery) -> list:
        """ts_rank knows no document frequency, so each term's rank is weighted by its IDF (as BM25 would)."""
        terms = [("simple", case_text.code_token(c)) for c in q.codes] + [("english", w) for w in q.words]
        params: dict = {f"t{i}": t for i, (_, t) in enumerate(terms)}
        tsq = [f"plainto_tsquery('{cfg}', :t{i})" for i, (cfg, _) in enumerate(terms)]
        table = case_text.TABLE
        counts = conn.execute(text("SELECT count(*), " + ", ".join(
            f"count(*) FILTER (WHERE doc @@ {t})" for t in tsq) + f" FROM {table}"), params).one()
        n, dfs = counts[0], counts[1:]
        live = [i for i, df in enumerate(dfs) if df]  # a term no case has (or a stop word) adds nothing
        if not live:
            return []
        for i in live:
            params[f"w{i}"] = math.log(1.0 + (n - dfs[i] + 0.5) / (dfs[i] + 0.5))
        score = " + ".join(f":w{i} * ts_rank({PG_RANK_WEIGHTS}, doc, {tsq[i]})" for i in live)
        where = " || ".join(tsq[i] for i in live)
        return conn.execute(text(f"SELECT case_id, {score} AS s FROM {table} WHERE doc @@ ({where}) "
                                 "ORDER BY s DESC, case_id"), params).all()
