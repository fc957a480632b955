"""Repair the case-mangled letters of PTB-XL's report texts, for showing them to people.

PTB-XL lower-cased its (mostly German and Swedish) reports with an ASCII-only lower-casing, so umlauts stayed
upper case inside lower-case words: "unbestÄtigter bericht", "sÅsom vid ischemi", "Ålder ej bestÄmd". A word
with lower-case letters and no upper-case ASCII letter never carries a capital umlaut in these languages except
at its start, so such letters go lower case: always inside a word, and at a word's start when the text before
it is lower case too (the lower-cased part of a report; a human "Edit: ... Übergang" after capitals is left).
UTF-8 read as Latin-1/cp1252 ("unbestÃ¤tigter") is decoded back. Display only: the store keeps the text
as PTB-XL ships it (what the encoder and the prompts were built on).
"""
from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")
_MOJIBAKE = re.compile("[\u00c2\u00c3].")  # a UTF-8 lead byte read as Latin-1/cp1252, and the byte after it


def _unmojibake(m: re.Match) -> str:
    pair = m.group(0)
    for enc in ("latin-1", "cp1252"):
        try:
            return pair.encode(enc).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
    return pair


def _is_lower_text(text: str) -> bool:
    """Whether `text` has letters and none of them is an upper-case ASCII letter."""
    return any(c.isalpha() for c in text) and not any("A" <= c <= "Z" for c in text)


def repair_report(text: str | None) -> str:
    """`text` with mojibake decoded and case-mangled umlauts (Ä Ö Ü Å ...) lower-cased; '' for None."""
    if not text:
        return ""
    text = _MOJIBAKE.sub(_unmojibake, text)
    out, last = [], 0
    for m in _WORD.finditer(text):
        word = m.group(0)
        if word.isascii() or any("A" <= c <= "Z" for c in word) or not any(c.islower() for c in word):
            continue
        head = word[0]
        before = text[max(0, m.start() - 40):m.start()]
        keep_head = head.isupper() and not (_is_lower_text(before) or (not before.strip() and _is_lower_text(text)))
        fixed = (head if keep_head else head.lower()) + word[1:].lower()
        out.append(text[last:m.start()] + fixed)
        last = m.end()
    out.append(text[last:])
    return "".join(out)
