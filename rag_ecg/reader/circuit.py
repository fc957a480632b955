"""A circuit breaker for a reader server: stop sending once it has plainly stopped answering.

Without one, a batch review against a hung server waits out every chart's timeout and retries in turn (about
an hour a batch at the old settings). The breaker opens after `threshold` consecutive failed calls
(timeouts, connection errors, 5xx, each after the HTTP client's own retries), or at once when a failed call
is followed by a failed health probe (the server does not even list its models). While open every call fails
at once with `ServerUnreachableError`, a BackendError: the review leaves the chart pending (not failed) and
stops the run when a whole batch could not be read. Every `cooldown_s` one call is let through (half-open),
so a long-lived process (the web app) recovers when the server is back; any answer (even a 4xx) closes it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from rag_ecg.errors import BackendError

log = logging.getLogger(__name__)


class ServerUnreachableError(BackendError):
    """The breaker is open: the server stopped answering; the chart stays pending for the next run."""


class CircuitBreaker:
    """Counts consecutive failures of calls to one server; thread-safe (review sends calls in parallel)."""

    def __init__(self, threshold: int, server: str, probe: Callable[[], bool] | None = None,
                 cooldown_s: float = 30.0):
        if threshold < 1:
            raise ValueError(f"breaker threshold {threshold}: must be >= 1")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._opened = 0.0  # monotonic time the breaker opened (or last let a trial call through)
        self.server = server
        self.probe = probe  # True when the server answers a cheap request (e.g. GET /v1/models)
        self.failures = 0
        self.reason: str | None = None  # set while open
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def check(self) -> None:
        """Raise ServerUnreachableError while open (no request is sent), except for one trial call a cooldown."""
        with self._lock:
            if self.reason is None:
                return
            if time.monotonic() - self._opened >= self.cooldown_s:
                self._opened = time.monotonic()  # half-open: this call goes through, the others wait again
                return
            reason = self.reason
        raise ServerUnreachableError(reason)

    def success(self) -> None:
        with self._lock:
            self.failures, self.reason = 0, None

    def failure(self, cause: str) -> None:
        """Record a failed call; open after `threshold` in a row, or now when the health probe fails too."""
        with self._lock:
            self.failures += 1
            n = self.failures
        probe_failed = n < self.threshold and self.probe is not None and not self.probe()
        if n >= self.threshold or probe_failed:
            why = "and it does not answer a health check" if probe_failed else f"{n} calls in a row failed"
            with self._lock:
                self._opened = time.monotonic()
                if self.reason is None:
                    self.reason = (f"{self.server} is unreachable ({why}; last: {cause}): stopped sending; "
                                   "the charts not read stay pending: fix the server and run again")
                    log.debug(self.reason)  # the error each call then raises says it; no second line
