"""The reader's answer as a JSON schema, so a server that constrains decoding returns a valid report.

vLLM (and other OpenAI-compatible servers) accept `response_format={"type": "json_schema", ...}` and then only
let the model emit JSON that matches it: the answer parses by construction instead of by retry. The pydantic
model below is the answer `parse.parse_answer` expects (same keys, ranges, superclasses); `answer_schema`
also pins `cited` to the case ids the prompt shows, so a citation of a case that was not shown cannot be
written at all. A `reasoning` string comes first when the prompt asks for step-by-step reasoning, so the
model can still think before it commits to the fields.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.reader.report import INTERVAL_RANGES, RATE_RANGE

Superclass = Literal[tuple(SUPERCLASSES)]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatementAnswer(_Strict):
    text: str = Field(min_length=1)
    cited: list[int]


class IntervalsAnswer(_Strict):
    pr_ms: Optional[float] = Field(ge=INTERVAL_RANGES["pr_ms"][0], le=INTERVAL_RANGES["pr_ms"][1])
    qrs_ms: Optional[float] = Field(ge=INTERVAL_RANGES["qrs_ms"][0], le=INTERVAL_RANGES["qrs_ms"][1])
    qt_ms: Optional[float] = Field(ge=INTERVAL_RANGES["qt_ms"][0], le=INTERVAL_RANGES["qt_ms"][1])
    qtc_ms: Optional[float] = Field(ge=INTERVAL_RANGES["qtc_ms"][0], le=INTERVAL_RANGES["qtc_ms"][1])


class DiagnosisAnswer(_Strict):
    code: Optional[str]
    superclass: Optional[Superclass]
    label: str = Field(min_length=1)
    confidence: float = Field(ge=0.0, le=1.0)
    cited: list[int]


class ReportAnswer(_Strict):
    """The report JSON of the prompt's ANSWER_SCHEMA; every key present, null where not estimable."""

    rhythm: Optional[StatementAnswer]
    rate_bpm: Optional[float] = Field(ge=RATE_RANGE[0], le=RATE_RANGE[1])
    axis: Optional[str]
    intervals: IntervalsAnswer
    findings: list[StatementAnswer]
    diagnoses: list[DiagnosisAnswer]
    impression: Optional[StatementAnswer]


class ReasonedReportAnswer(ReportAnswer):
    """The step-by-step variant: the reasoning is written first, then the report fields."""

    reasoning: str


@lru_cache(maxsize=2)
def _base_schema(reasoning: bool) -> dict:
    schema = (ReasonedReportAnswer if reasoning else ReportAnswer).model_json_schema()
    if reasoning:  # reasoning first: generation follows the property order
        props = schema["properties"]
        schema["properties"] = {"reasoning": props.pop("reasoning"), **props}
        schema["required"] = ["reasoning", *[k for k in schema["required"] if k != "reasoning"]]
    return schema


def answer_schema(case_ids: Sequence[int], reasoning: bool = False) -> dict:
    """The JSON schema of the answer; `cited` items limited to `case_ids` (empty: nothing may be cited)."""
    schema = copy.deepcopy(_base_schema(reasoning))
    ids = sorted({int(c) for c in case_ids})
    for name in ("StatementAnswer", "DiagnosisAnswer"):
        cited = schema["$defs"][name]["properties"]["cited"]
        cited["items"] = {"type": "integer", "enum": ids} if ids else {"type": "integer", "enum": [0]}
        if not ids:
            cited["maxItems"] = 0
    return schema


def response_format(case_ids: Sequence[int], reasoning: bool = False) -> dict:
    """The OpenAI `response_format` asking the server to constrain decoding to the report schema."""
    return {"type": "json_schema",
            "json_schema": {"name": "ecg_report", "schema": answer_schema(case_ids, reasoning), "strict": True}}
