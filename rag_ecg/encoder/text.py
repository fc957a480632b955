"""The text side of the encoder: what a case's text is (`case_text`) and how it becomes token ids.

PTB-XL reports are mostly German, so a case's text is the English descriptions of its SCP-ECG codes followed
by the report, tokenized by open_clip's offline SimpleTokenizer (its BPE vocabulary ships in the package).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

CASE_TEXT_VERSION = "codes-then-report/1"  # recorded in checkpoint manifests: change it when case_text changes


def case_text(report: str, codes: Mapping[str, float] | None, descriptions: Mapping[str, str] | None) -> str:
    """The text of a case: English SCP-code descriptions (most likely first), then the free-text report.

    English first because the tokenizer keeps only the first 77 tokens and the descriptions are the part
    every case shares a language for; unknown codes appear as the code itself.
    """
    descriptions = descriptions or {}
    ordered = sorted((codes or {}).items(), key=lambda kv: (-float(kv[1] or 0.0), kv[0]))
    parts, seen = [], set()
    for code, _ in ordered:
        d = (descriptions.get(code) or code).strip()
        if d and d.lower() not in seen:
            seen.add(d.lower())
            parts.append(d)
    head = "; ".join(parts)
    report = " ".join((report or "").split())
    if head and report:
        return f"{head}. {report}"
    return head or report


class Tokenizer:
    """open_clip's SimpleTokenizer (BPE vocabulary shipped in the package: works offline)."""

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """list of str -> (n, context_length) int64 token ids (truncated, end-of-text kept)."""
        return self._tok(list(texts), context_length=self.context_length)
