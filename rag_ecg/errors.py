"""One root for every error rag-ecg raises on purpose, so callers (and `cli.py`) catch one type.

Each family carries the exit code the CLI returns for it. The families also subclass the builtin a caller
would naturally catch (`ValueError` for bad input, `RuntimeError` for failing services), so code written
against the builtins keeps working.
"""
from __future__ import annotations


class RagEcgError(Exception):
    """Anything rag-ecg reports to its user as one line (exit code 1 unless a family says otherwise)."""

    exit_code = 1


class InputError(RagEcgError, ValueError):
    """The input (file, record, picture, option, config) is wrong or unreadable: fix the input."""

    exit_code = 2


class ConfigError(InputError):
    """A config file or `key=value` override is missing, malformed or names an unknown field."""


class BackendError(RagEcgError, RuntimeError):
    """A reader backend or server (LLM, vLLM HTTP) failed or is unreachable: retry or fix the service."""

    exit_code = 3


class ArtifactError(RagEcgError, RuntimeError):
    """A saved artifact (encoder checkpoint, index, job) is missing, corrupt or does not match its peers."""

    exit_code = 4


EXIT_CODES = {"error": RagEcgError.exit_code, "bad input": InputError.exit_code,
              "backend or server": BackendError.exit_code, "artifact missing or mismatched": ArtifactError.exit_code}
