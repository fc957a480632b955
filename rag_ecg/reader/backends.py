"""Choosing a reader backend by name (or from a YAML file): `retrieval` (default), `hf`, `vllm`.

    backend = get_backend("retrieval")                # or "hf" (model_path=...), "vllm" (base_url=...)
    name, options = backend_settings("reader.yaml", max_tokens=700)   # the CLI: a file + flags

Options are the fields of each backend's config dataclass plus the prompt options every text backend takes
(`cot`, `max_cases`), so `review` and `eval` (which hand options on by name) shape the prompt like `report`.
The hf and vllm modules are imported only in their branch, so choosing the retrieval reader never loads
torch/transformers or the openai client.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_ecg.config import load_config
from rag_ecg.errors import BackendError, InputError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.retrieval import RetrievalBackend, RetrievalReaderConfig

BACKENDS = ("retrieval", "hf", "vllm")
PROMPT_OPTIONS = ("cot", "max_cases")  # how the prompt is built; taken by every backend, used by text backends
ANSWER_LENGTH = {"hf": "max_new_tokens", "vllm": "max_tokens"}  # the option `--max-tokens` sets, per backend


@dataclass
class BackendFile:
    """A reader backend as a YAML file names it: `backend: vllm` and `options:` (its config fields + cot,
    max_cases)."""

    backend: str = "retrieval"
    options: dict = field(default_factory=dict)


def get_backend(name: str, **options: Any) -> LLMBackend:
    """Build a backend by name; options go to its constructor (see each backend's config dataclass), except
    the prompt options (`cot`, `max_cases`), which set how `interpret` asks it."""
    prompt = {k: options.pop(k) for k in PROMPT_OPTIONS if k in options}
    if prompt.get("max_cases") is not None and int(prompt["max_cases"]) < 0:
        raise InputError(f"max_cases {prompt['max_cases']}: must be >= 0")
    if name == "retrieval":
        backend: LLMBackend = RetrievalBackend(**options)
    elif name == "hf":
        from rag_ecg.reader.hf import HFBackend

        if not options.get("model_path"):
            raise BackendError("the hf backend needs model_path: a local LLaVA-NeXT folder (e.g. PULSE-7B "
                               "converted with training/convert_pulse.py)")
        backend = HFBackend(**options)
    elif name == "vllm":
        from rag_ecg.reader.vllm import VLLMBackend

        backend = VLLMBackend(**options)
    else:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if "cot" in prompt:
        backend.cot = bool(prompt["cot"])
    if prompt.get("max_cases") is not None:
        backend.max_cases = int(prompt["max_cases"])
    return backend


def _config_class(name: str) -> type:
    if name == "retrieval":
        return RetrievalReaderConfig
    if name == "hf":
        from rag_ecg.reader.hf import HFConfig

        return HFConfig
    if name == "vllm":
        from rag_ecg.reader.vllm import VLLMConfig

        return VLLMConfig
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def _check_options(name: str, options: dict, where: str) -> dict:
    fields = {f.name for f in dataclasses.fields(_config_class(name))} | set(PROMPT_OPTIONS)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BackendError(f"{where}: unknown option(s) {', '.join(unknown)} for backend {name!r} "
                           f"(known: {', '.join(sorted(fields))})")
    return options


def backend_settings(config: str | Path | dict | None = None, backend: str | None = None,
                     max_tokens: int | None = None, **flags: Any) -> tuple[str, dict]:
    """(name, options) from a YAML file (or dict) and command-line flags; a flag given (not None) wins.

    `max_tokens` is the answer-length cap under the name the backend uses (hf: max_new_tokens); the retrieval
    reader writes no answer, so asking it for one is an error rather than silently ignored."""
    if isinstance(config, dict):
        spec, where = BackendFile(**config), "backend config"
    else:
        spec = load_config(BackendFile, config, what="backend config")
        where = str(config) if config is not None else "options"
    name = backend or spec.backend
    options = dict(spec.options or {})
    options.update({k: v for k, v in flags.items() if v is not None})
    if max_tokens is not None:
        if name not in ANSWER_LENGTH:
            raise InputError(f"--max-tokens: the {name} reader writes no answer text (use it with hf or vllm)")
        options[ANSWER_LENGTH[name]] = int(max_tokens)
    return name, _check_options(name, options, where)


def backend_from_config(config: str | Path | dict) -> LLMBackend:
    """A backend from YAML (or a dict): `backend: vllm` plus `options:` named as in its config dataclass."""
    name, options = backend_settings(config)
    return get_backend(name, **options)
