"""The one interface every reader backend implements.

A backend turns chat messages plus images into answer text (`generate`); `rag_ecg.reader.messages` holds
the message forms they accept. Backends that need no text generation (the retrieval reader) set
`composes_reports` and build the Report from the evidence directly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

from rag_ecg.errors import BackendError
from rag_ecg.reader.token_budget import FittedPrompt, fit_prompt, plain_prompt

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.reader.report import Report
    from rag_ecg.search.evidence import Evidence


class LLMBackend(ABC):
    """Messages + images -> answer text."""

    name: str = ""
    model: str = ""
    composes_reports: bool = False  # True: build reports with `compose(evidence)`, no text generation
    max_concurrency: int = 1  # how many generations may usefully run at once (callers fan out up to it)
    cot: bool = True  # prompt: step-by-step reasoning before the JSON (False: the JSON alone)
    max_cases: int | None = None  # prompt: show at most this many of the retrieved cases (None: all)

    @abstractmethod
    def generate(self, messages: Sequence[Any], images: Sequence["Image.Image"] = ()) -> str:
        """The assistant's answer to the conversation."""

    def prepare(self, evidence: "Evidence", image: "Image.Image | None" = None, cot: bool = True,
                max_cases: int | None = None, measured: str = "") -> FittedPrompt:
        """The prompt for one chart; a backend that knows its context window (`window`, with `count` and
        `min_answer`: vllm, hf) fits it there, the lowest-ranked cases dropped with a note."""
        window = getattr(self, "window", None)
        if window is None:
            return plain_prompt(evidence, image, cot, max_cases, measured)
        return fit_prompt(evidence, image, cot, max_cases, measured, self.count, window, self.min_answer)

    def compose(self, evidence: "Evidence", measurements: dict | None = None) -> "Report":
        raise BackendError(f"backend {self.name!r} generates text; use interpret() to build a report")

    def close(self) -> None:  # noqa: B027 - a no-op default; backends holding resources override it
        """Release clients or model memory; the backend must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
