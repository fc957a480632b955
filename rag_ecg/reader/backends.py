"""Choosing a reader backend by name (or from a YAML file): `retrieval` (default), `hf`, `vllm`.

    backend = get_backend("retrieval")                # or "hf" (model_path=...), "vllm" (base_url=...)

The hf and vllm modules are imported only in their branch, so choosing the retrieval reader never loads
torch/transformers or the openai client.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rag_ecg.config import read_yaml
from rag_ecg.errors import BackendError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.retrieval import RetrievalBackend, RetrievalReaderConfig

BACKENDS = ("retrieval", "hf", "vllm")


def get_backend(name: str, **options: Any) -> LLMBackend:
    """Build a backend by name; options go to its constructor (see each backend's config dataclass)."""
    if name == "retrieval":
        return RetrievalBackend(**options)
    if name == "hf":
        from rag_ecg.reader.hf import HFBackend

        if not options.get("model_path"):
            raise BackendError("the hf backend needs model_path: a local LLaVA-NeXT folder (e.g. PULSE-7B "
                               "converted with training/convert_pulse.py)")
        return HFBackend(**options)
    if name == "vllm":
        from rag_ecg.reader.vllm import VLLMBackend

        return VLLMBackend(**options)
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


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


def backend_from_config(config: str | Path | dict) -> LLMBackend:
    """A backend from YAML (or a dict): `backend: vllm` plus `options:` named as in its config dataclass."""
    where = str(config) if not isinstance(config, dict) else "backend config"
    if not isinstance(config, dict):
        config = read_yaml(config, "backend config")
    name = config.get("backend", "retrieval")
    options = dict(config.get("options") or {})
    fields = {f.name for f in dataclasses.fields(_config_class(name))}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BackendError(f"{where}: unknown option(s) {', '.join(unknown)} for backend {name!r} "
                           f"(known: {', '.join(sorted(fields))})")
    return get_backend(name, **options)
