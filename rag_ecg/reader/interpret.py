"""Reader backends behind one interface, and `interpret`: evidence + image -> grounded Report.

    backend = get_backend("retrieval")                # or "hf" (model_path=...), "vllm" (base_url=...)
    report = interpret(image, evidence, backend)      # prompt -> generate -> parse -> retry -> cite-check

Only the chosen backend's heavy dependencies are imported (torch/transformers for hf, openai for vllm).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rag_ecg.reader.base import BackendError, LLMBackend
from rag_ecg.reader.report import ParseError, Report, RetrievalInfo, check_citations, parse_answer, unparsed_report

if TYPE_CHECKING:
    from PIL import Image

    from rag_ecg.search.evidence import Evidence

BACKENDS = ("retrieval", "hf", "vllm")

__all__ = ["BACKENDS", "BackendError", "LLMBackend", "backend_from_config", "get_backend", "interpret",
           "interpret_many", "report_command"]


def get_backend(name: str, **options: Any) -> LLMBackend:
    """Build a backend by name; options go to its constructor (see each backend's config dataclass)."""
    if name == "retrieval":
        from rag_ecg.reader.retrieval import RetrievalBackend

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


def _config_class(name: str):
    if name == "retrieval":
        from rag_ecg.reader.retrieval import RetrievalReaderConfig as cls
    elif name == "hf":
        from rag_ecg.reader.hf import HFConfig as cls
    elif name == "vllm":
        from rag_ecg.reader.vllm import VLLMConfig as cls
    else:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return cls


def backend_from_config(config: "str | Path | dict") -> LLMBackend:
    """A backend from YAML (or a dict): `backend: vllm` plus `options:` named as in its config dataclass."""
    import dataclasses

    where = str(config) if not isinstance(config, dict) else "backend config"
    if not isinstance(config, dict):
        import yaml

        path = Path(config)
        if not path.exists():
            raise BackendError(f"{path}: no such backend config file")
        config = yaml.safe_load(path.read_text()) or {}
    name = config.get("backend", "retrieval")
    options = dict(config.get("options") or {})
    fields = {f.name for f in dataclasses.fields(_config_class(name))}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BackendError(f"{where}: unknown option(s) {', '.join(unknown)} for backend {name!r} "
                           f"(known: {', '.join(sorted(fields))})")
    return get_backend(name, **options)


def _load_image(image: "Image.Image | str | Path | None"):
    if image is None or not isinstance(image, (str, Path)):
        return image
    from PIL import Image as PILImage, UnidentifiedImageError

    try:
        with PILImage.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BackendError(f"{image}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BackendError(f"{image}: not a readable image ({exc})") from None


def interpret(image: "Image.Image | str | Path | None", evidence: "Evidence", backend: LLMBackend,
              retries: int = 1, cot: bool = True, max_cases: int | None = None) -> Report:
    """The grounded report for one query image: a malformed answer is retried `retries` times with the
    parser's error, then kept as unparsed free text; citations to cases not retrieved are dropped.
    `cot`/`max_cases` shorten the prompt for small context windows (see prompts.build_messages)."""
    if backend.composes_reports:
        report = backend.compose(evidence)
    else:
        from rag_ecg.reader.prompts import build_messages, retry_messages

        img = _load_image(image)
        images = [img] if img is not None else []
        messages = build_messages(evidence, img, cot=cot, max_cases=max_cases)
        answer = backend.generate(messages, images)
        for attempt in range(retries + 1):
            try:
                report = parse_answer(answer)
                break
            except ParseError as exc:
                if attempt == retries:
                    report = unparsed_report(answer, str(exc))
                    break
                messages = retry_messages(messages, answer, str(exc))
                answer = backend.generate(messages, images)
    report = replace(report, backend=backend.name, model=backend.model,
                     retrieval=RetrievalInfo.from_evidence(evidence))
    return check_citations(report, evidence)


def interpret_many(items: Sequence[tuple[Any, "Evidence"]], backend: LLMBackend, retries: int = 1,
                   max_concurrency: int | None = None, cot: bool = True,
                   max_cases: int | None = None) -> list[Report | BackendError]:
    """Reports in input order; a failed item yields its BackendError instead of stopping the batch."""
    workers = max(1, min(max_concurrency or backend.max_concurrency, len(items) or 1))

    def one(item):
        try:
            return interpret(item[0], item[1], backend, retries, cot=cot, max_cases=max_cases)
        except BackendError as exc:
            return exc

    if workers == 1:
        return [one(it) for it in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="interpret") as pool:
        return list(pool.map(one, items))


def report_command(image_path: str | Path | None, evidence: "Evidence", backend: str = "retrieval",
                   fmt: str = "text", out: str | Path | None = None, retries: int = 1,
                   backend_options: dict | None = None, cot: bool = True, max_cases: int | None = None) -> str:
    """What `cli.py report` prints: interpret, render as text/json/html, optionally save atomically."""
    if fmt not in ("text", "json", "html"):
        raise ValueError(f"--format {fmt!r}: expected text, json or html")
    be = get_backend(backend, **(backend_options or {}))
    try:
        report = interpret(image_path, evidence, be, retries=retries, cot=cot, max_cases=max_cases)
    finally:
        be.close()
    kwargs = {"query_image": image_path} if fmt == "html" and image_path is not None else {}
    rendered = report.render(fmt, **kwargs)
    if out is not None:
        from rag_ecg.reader.report import write_atomic

        write_atomic(Path(out), rendered)
    return rendered
