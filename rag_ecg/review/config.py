"""The settings of a batch review and its error: what a run is told, and which settings make the job key."""
from __future__ import annotations

from dataclasses import dataclass, field

from rag_ecg.config import from_dict
from rag_ecg.errors import RagEcgError

STAGES = ("load", "embed", "search", "report")
STATUSES = ("done", "unparsed", "error", "pending")  # a chart's status; unparsed: the answer held no report
ENGINES = ("local", "ray")
THUMBS = "thumbs"
FULL_WIDTH = 1600  # px: the full-size chart (and trace overlay) the review page opens on a click
# backend options that do not change a report (where the server is, how long to wait, secrets)
RESULT_NEUTRAL_OPTIONS = frozenset({"base_url", "api_key", "timeout_s", "max_retries", "backoff_s",
                                    "max_concurrency", "device", "breaker_failures",
                                    "breaker_cooldown_s"})


class ReviewError(RagEcgError, RuntimeError):
    """The review cannot start or go on (bad input, settings or index); the message says why."""

    exit_code = 2


@dataclass
class ReviewConfig:
    """Settings of a batch review (those in `result_settings()` are part of the job key)."""

    backend: str = "retrieval"  # reader: retrieval | hf | vllm
    backend_options: dict = field(default_factory=dict)  # passed to llm.get_backend (model_path, base_url, ...)
    k: int = 8  # neighbours retrieved (and shown) per chart
    workers: int = 2  # chart loading/rendering processes, and concurrent LLM calls for text backends
    batch_size: int = 16  # charts per encoder forward pass and per store commit
    engine: str = "local"  # local (this machine) | ray (Ray Data: a local instance or a cluster)
    limit: int | None = None  # add at most this many charts of the input to the job (first in input order)
    preset: str = "clean"  # render preset for WFDB / store charts (signals are drawn as pages first)
    dpi: int | None = None  # render resolution for WFDB / store charts (None: the index's build dpi)
    device: str = "cpu"  # encoder device (cpu | cuda | auto)
    max_attempts: int = 3  # a chart that was being processed when a run died this often is marked error
    retry_errors: bool = False  # put charts that ended in error (or unparsed) back to pending before running
    thumb_width: int = 320  # width in px of the chart / neighbour thumbnails written under thumbs/
    image_max_side: int = 1600  # longest side in px of the page handed to text (LLM) backends
    html_rows: int = 2000  # most charts listed in index.html (results.csv / .jsonl always hold all)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ReviewError(f"engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.k < 1 or self.batch_size < 1 or self.workers < 0 or self.max_attempts < 1:
            raise ReviewError(f"review settings: k ({self.k}), batch_size ({self.batch_size}) and max_attempts "
                              f"({self.max_attempts}) must be >= 1 and workers ({self.workers}) >= 0")
        if self.limit is not None and self.limit < 1:
            raise ReviewError(f"limit {self.limit}: must be >= 1 (or None for all charts)")

    def result_settings(self) -> dict:
        """The settings that change a chart's result (secrets left out): they make the job key."""
        opts = {k: v for k, v in sorted(self.backend_options.items())
                if k not in RESULT_NEUTRAL_OPTIONS and not any(s in k.lower() for s in ("password", "secret"))}
        return {"backend": self.backend, "backend_options": opts, "k": self.k, "preset": self.preset,
                "dpi": self.dpi}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReviewConfig":
        """A config from a mapping of its fields (unknown fields: a ConfigError naming them)."""
        return from_dict(cls, d, "review config")
