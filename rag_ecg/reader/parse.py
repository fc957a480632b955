"""Reading a model's answer into a Report: find the JSON, validate every field, name what is wrong.

Answers come from language models: the JSON may sit in a fence, after reasoning text, with trailing commas,
cut off by the token limit, or with numbers written as "72 bpm". What can be read safely is read; anything
else is a ParseError whose message (quoted back to the model on a retry) says which field is wrong and why.
"""
from __future__ import annotations

import json
import re
from typing import Any

from rag_ecg.data.labels import SUPERCLASS_NAMES, SUPERCLASSES
from rag_ecg.errors import InputError
from rag_ecg.reader.report import INTERVAL_RANGES, RATE_RANGE, Diagnosis, Intervals, Report, Statement, inline_citations

_ANSWER_KEYS = ("rhythm", "rate_bpm", "axis", "intervals", "findings", "diagnoses", "impression")


class ParseError(InputError):
    """A model answer that does not hold a valid report JSON; the message says what is wrong."""


def extract_json(text: str) -> dict:
    """The report JSON object from an answer: the last ```json fence, else the last balanced {...}."""
    if not text or not text.strip():
        raise ParseError("the answer is empty")
    fences = list(re.finditer(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", text, re.S))
    for m in reversed(fences):
        obj = _loads_object(m.group(1))
        if obj is not None:
            return obj
    if text.count("```") % 2 == 1:  # a fence was opened and never closed: the answer was cut off
        tail = re.sub(r"^(?:json|JSON)?[ \t]*\n?", "", text.rsplit("```", 1)[1])
        if "{" in tail:
            obj = _loads_object(tail)
            if obj is not None:
                return obj
            raise ParseError("the ```json block is not closed and its JSON is incomplete (answer truncated?)")
    objects, unclosed = _balanced_objects(text)
    for span in reversed(objects):
        obj = _loads_object(span)
        if obj is not None and any(k in obj for k in _ANSWER_KEYS):
            return obj
    if unclosed:
        raise ParseError("the JSON object is not closed (answer truncated?)")
    if objects:
        raise ParseError("found {...} text but none of it is valid JSON with the report keys")
    raise ParseError("no JSON object found in the answer")


def _loads_object(s: str) -> dict | None:
    for candidate in (s, re.sub(r",\s*([}\]])", r"\1", s)):  # then tolerate trailing commas
        try:
            obj = json.loads(candidate.strip())
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _balanced_objects(text: str) -> tuple[list[str], bool]:
    """Top-level {...} spans (string-aware), and whether an object was left open at the end."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start:i + 1])
    return spans, depth > 0


def parse_answer(text: str) -> Report:
    """Validate the answer's JSON into a Report (parsed=True); raise ParseError naming the bad field."""
    obj = extract_json(text)
    if not any(k in obj for k in _ANSWER_KEYS):
        raise ParseError(f"the JSON has none of the report keys ({', '.join(_ANSWER_KEYS)})")
    intervals_in = obj.get("intervals") or {}
    if not isinstance(intervals_in, dict):
        raise ParseError("intervals must be an object with pr_ms, qrs_ms, qt_ms (numbers or null)")
    intervals = Intervals(**{k: _number(intervals_in.get(k), f"intervals.{k}", INTERVAL_RANGES[k])
                             for k in INTERVAL_RANGES})
    findings_in = obj.get("findings") or []
    if not isinstance(findings_in, list):
        raise ParseError("findings must be a list of {text, cited}")
    diagnoses_in = obj.get("diagnoses") or []
    if not isinstance(diagnoses_in, list):
        raise ParseError("diagnoses must be a list of {code, superclass, label, confidence, cited}")
    axis = obj.get("axis")
    if axis is not None and not isinstance(axis, str):
        raise ParseError("axis must be a string or null")
    return Report(
        rhythm=_statement(obj.get("rhythm"), "rhythm"),
        rate_bpm=_number(obj.get("rate_bpm", obj.get("rate")), "rate_bpm", RATE_RANGE),
        axis=_none_if_unknown(axis),
        intervals=intervals,
        findings=[s for i, f in enumerate(findings_in) if (s := _statement(f, f"findings[{i}]"))],
        diagnoses=[_diagnosis(d, f"diagnoses[{i}]") for i, d in enumerate(diagnoses_in)],
        impression=_statement(obj.get("impression"), "impression"),
        parsed=True, raw_text=text,
    )


_UNKNOWN = {"", "null", "none", "n/a", "na", "unknown", "not estimable", "not measurable", "-"}


def _none_if_unknown(s: str | None) -> str | None:
    return None if s is None or s.strip().lower() in _UNKNOWN else s.strip()


def _number(v: Any, where: str, bounds: tuple[float, float]) -> float | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _UNKNOWN):
        return None
    if isinstance(v, bool):
        raise ParseError(f"{where} must be a number or null, got {v!r}")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:bpm|ms|/min)?\s*", v, re.I)
        if not m:
            raise ParseError(f"{where} must be a number or null, got {v!r}")
        v = float(m.group(1))
    if not isinstance(v, (int, float)):
        raise ParseError(f"{where} must be a number or null, got {type(v).__name__}")
    lo, hi = bounds
    if not lo <= float(v) <= hi:
        raise ParseError(f"{where}={v:g} is outside the plausible range {lo:g}-{hi:g}")
    return float(v)


def _cited(v: Any, where: str) -> list[int]:
    if v is None:
        return []
    items = v if isinstance(v, list) else re.split(r"[,;]", v) if isinstance(v, str) else [v]
    out = []
    for x in items:
        if isinstance(x, bool):
            raise ParseError(f"{where}.cited must hold case ids (integers), got {x!r}")
        if isinstance(x, int):
            out.append(x)
            continue
        m = re.fullmatch(r"\s*\[?\s*(?:case\s*#?\s*)?(\d+)\s*\]?\s*", str(x), re.I)
        if not m:
            raise ParseError(f"{where}.cited must hold case ids (integers), got {x!r}")
        out.append(int(m.group(1)))
    return list(dict.fromkeys(out))


def _statement(v: Any, where: str) -> Statement | None:
    if v is None:
        return None
    if isinstance(v, str):
        text = _none_if_unknown(v)
        return None if text is None else Statement(text, inline_citations(text))
    if not isinstance(v, dict):
        raise ParseError(f"{where} must be {{\"text\": ..., \"cited\": [...]}} or a string")
    text = v.get("text", v.get("statement"))
    if text is None or not isinstance(text, str) or _none_if_unknown(text) is None:
        if where in ("rhythm", "impression") and not v.get("cited"):
            return None
        raise ParseError(f"{where}.text must be a non-empty string")
    return Statement(text.strip(), _cited(v.get("cited", v.get("cites", v.get("citations"))), where))


def _diagnosis(v: Any, where: str) -> Diagnosis:
    if not isinstance(v, dict):
        raise ParseError(f"{where} must be an object with code, superclass, label, confidence, cited")
    code = v.get("code") or None
    sup = v.get("superclass") or None
    if code is not None and not isinstance(code, str):
        raise ParseError(f"{where}.code must be an SCP-ECG code string or null")
    if sup is not None:
        if not isinstance(sup, str) or sup.strip().upper() not in SUPERCLASSES:
            raise ParseError(f"{where}.superclass must be one of {', '.join(SUPERCLASSES)} or null, got {sup!r}")
        sup = sup.strip().upper()
    label = v.get("label") or v.get("text")
    if label is not None and not isinstance(label, str):
        raise ParseError(f"{where}.label must be a string")
    label = (label or "").strip() or (SUPERCLASS_NAMES.get(sup, "") if sup else "") or (code or "")
    if not label:
        raise ParseError(f"{where} needs a label, code or superclass")
    conf = v.get("confidence")
    if conf is None:
        raise ParseError(f"{where}.confidence is missing (a number in [0, 1])")
    conf = _number(conf, f"{where}.confidence", (0.0, 1.0))
    return Diagnosis(label=label, confidence=float(conf), code=code.strip().upper() if code else None,
                     superclass=sup, cited=_cited(v.get("cited", v.get("cites")), where))
