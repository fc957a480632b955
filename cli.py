"""rag-ecg command line: the one entry point (`python cli.py --help`).

Each command is a thin typed wrapper over a job in `index/` or `training/` or a library call in `rag_ecg/`.
Each command imports what it runs inside its own body, on purpose: importing every job up front costs ~10 s
(torch, open_clip, FAISS, OpenCV, wfdb), which `--help` or a one-line error should not pay.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on (or reach for) a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup

from rag_ecg import paths
from rag_ecg.errors import InputError, RagEcgError

console = Console(soft_wrap=True)  # paths and summary lines whole, one a line, whatever the terminal width
err = Console(stderr=True, soft_wrap=True)

# Exit codes (README "Exit codes"): 0 ok, 1 other error, 2 bad input (file, record, picture, option, config),
# 3 reader backend or server failed, 4 artifact missing or mismatched (encoder, index, job).
USER_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class OneLineErrors(TyperGroup):
    """Every command reports rag-ecg's errors (and unreadable user files) as one line and a documented exit
    code, instead of a traceback; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RagEcgError as exc:
            _print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except USER_FILE_ERRORS as exc:
            _print_error(exc)
            raise typer.Exit(2) from None


def _print_error(exc: BaseException) -> None:
    logging.getLogger("rag_ecg").debug("where it happened", exc_info=exc)  # --verbose shows the traceback
    text = " ".join(str(exc).split()) or type(exc).__name__
    err.print(f"[red]error:[/] {text}", markup=True, highlight=False, soft_wrap=True)  # one line, any width


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=OneLineErrors,
                  help="Interpret ECG images by retrieving similar past cases.")


@app.callback()
def _logging(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug messages too"),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only")) -> None:
    """Library modules log through named loggers (`rag_ecg.*`, `index.*`, `training.*`); show them here."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=Console(stderr=True), show_time=verbose, show_path=verbose,
                          show_level=verbose, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("rag_ecg", "index", "training"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False

DbOpt = typer.Option(None, "--db", help="SQLAlchemy URL of the case store "
                     "(default: $RAG_ECG_DB or a SQLite file under ./data).")
# the reader's options, the same on report, review and eval (docs/serving.md)
BackendOpt = typer.Option(None, "--backend", help="retrieval | hf | vllm (default: --backend-config's, else retrieval)")
BackendConfigOpt = typer.Option(None, "--backend-config", help="YAML: `backend:` and `options:` (VLLMConfig / "
                                "HFConfig fields, cot, max_cases); flags given override it")
MaxTokensOpt = typer.Option(None, "--max-tokens", help="hf/vllm: answer length cap (vllm: lowered to fit the window)")
NoCotOpt = typer.Option(False, "--no-cot", help="JSON-only prompt, no step-by-step reasoning (small windows)")
MaxCasesOpt = typer.Option(None, "--max-cases", help="show the LLM at most this many of the k cases")
SexOpt = typer.Option(None, help="the patient's sex, M | F: the V2-V3 STEMI threshold and long QTc (default: the "
                      "record's header; a picture's is unknown: 1.5 mm, 460 ms)")
AgeOpt = typer.Option(None, help="the patient's age in years (men < 40: 2.5 mm in V2-V3)")


def _sex(sex: Optional[str]) -> Optional[str]:
    """--sex as M or F (None: not given); anything else is one line, exit 2."""
    if sex is None:
        return None
    first = sex.strip().upper()[:1]  # "" for an empty value: not M or F either
    if first not in ("M", "F"):
        raise InputError(f"--sex {sex!r} is not M or F")
    return first


def _reader(config: Optional[Path], backend: Optional[str], max_tokens: Optional[int], no_cot: bool,
            max_cases: Optional[int], **flags) -> tuple[str, dict]:
    """(backend name, options) from --backend-config and the reader flags (a flag given wins)."""
    from rag_ecg.reader.backends import backend_settings

    return backend_settings(config, backend, max_tokens=max_tokens, cot=False if no_cot else None,
                            max_cases=max_cases, **flags)


def _store(db: Optional[str]):
    from rag_ecg.data.store import open_store

    return open_store(db)


def print_summary(store) -> None:
    from rag_ecg.data.labels import SUPERCLASSES
    from rag_ecg.data.store import summary

    s = summary(store)
    table = Table(title=f"case store: {s['total']} cases")
    table.add_column("source")
    table.add_column("cases", justify="right")
    for lab in (*SUPERCLASSES, "(none)"):
        table.add_column(lab, justify="right")
    for source, n in sorted(s["by_source"].items()):
        per = s["by_label"].get(source, {})
        table.add_row(source, str(n), *[str(per.get(lab, 0)) for lab in (*SUPERCLASSES, "(none)")])
    console.print(table)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(s["by_split"].items()))
    console.print(f"splits: {splits}")


@app.command()
def ingest(source: str = typer.Argument(..., help="ptbxl | ludb | wfdb (any folder of WFDB records)"),
           path: Path = typer.Argument(..., help="dataset folder (or one .hea for wfdb)"),
           db: Optional[str] = DbOpt,
           batch_size: int = typer.Option(64, help="records per transaction"),
           limit: Optional[int] = typer.Option(None, help="ingest only the first N records")) -> None:
    """Read WFDB records with their reports and labels into the case store (idempotent)."""
    from index.ingest import ingest as run_ingest

    store = _store(db)
    res = run_ingest(store, source, path, batch_size=batch_size, limit=limit)
    console.print(f"{source}: {res.seen} records read, {res.inserted} new, {res.updated} updated, "
                  f"{len(res.skipped)} skipped")
    print_summary(store)


@app.command()
def stats(db: Optional[str] = DbOpt) -> None:
    """Print what the case store holds (counts per source, superclass and split)."""
    print_summary(_store(db))


def _index_dir(index: str) -> Path:
    p = Path(index)
    return p if p.is_dir() or "/" in index else paths.index_dir() / index


@app.command()
def render(inputs: list[Path] = typer.Argument(..., help="WFDB records (.hea) or folders of them"),
           out: Path = typer.Option(..., "--out", help="output folder"),
           layout: str = typer.Option("3x4+II", help="3x4 | 3x4+II | 6x2 | 6x2+II | 12x1 | random"),
           preset: str = typer.Option("clean", help="clean | print | scan | photo | random"),
           seed: int = 0, workers: int = typer.Option(0, help="processes (0: all cores)"),
           dpi: int = 200, image_format: str = typer.Option("png", help="png | jpg")) -> None:
    """Render ECG records as paper-ECG images (+ layout JSON), in parallel."""
    from index.render_job import render_many

    written = render_many(inputs, out, layout=None if layout == "random" else layout, preset=preset, seed=seed,
                          workers=workers, dpi=dpi, image_format=image_format)
    console.print(f"{len(written)} images written to {out}")


@app.command()
def digitize(images: list[Path] = typer.Argument(..., help="pictures (PNG/JPEG/BMP/TIFF/HEIC, every PDF page) or folders of them"),
             out: Path = typer.Option(..., "--out", help="output folder"),
             speed: float = typer.Option(25.0, help="paper speed, mm/s"),
             gain: Optional[float] = typer.Option(None, help="gain, mm/mV (default: 10, or 5/20 where the "
                                                  "calibration pulse shows it)"),
             force: bool = typer.Option(False, "--force", help="read pictures whose outputs already exist again"),
             method: str = typer.Option("auto", help="auto (classical, the learned segmenter where it fails), "
                                        "classical (ink map; best on other renderers' pages) or learned "
                                        "(the shipped trace segmenter)")) -> None:
    """Read ECG pictures into signals: per picture DIR/<stem>.hea/.dat (WFDB, 12 leads, mV, 500 Hz, 10 s; NaN where
    a lead is not printed), <stem>.json (layout, lead boxes, px/mm and its source, quality), <stem>.overlay.png.

    Resumable (pictures whose outputs exist are skipped). Exit code: 0 all pictures read or skipped; 2 some could
    not be read (one line each names the file and why)."""
    from rag_ecg.paper.digitize_job import run_batch

    def report(line: str) -> None:
        err.print(f"[red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)

    summary = run_batch(images, out, speed_mm_s=speed, gain_mm_mv=gain, force=force, console=err, report=report,
                        method=method)
    console.print(summary.text(), soft_wrap=True)
    if summary.failed:
        raise typer.Exit(2)


@app.command()
def measure(inputs: list[Path] = typer.Argument(..., help="pictures or WFDB records (.hea)"),
            fmt: str = typer.Option("table", "--format", help="table | json"),
            sex: Optional[str] = SexOpt, age: Optional[float] = AgeOpt,
            speed: float = typer.Option(25.0, help="paper speed of pictures, mm/s"),
            gain: Optional[float] = typer.Option(None, help="gain of pictures, mm/mV (default: 10 or the pulse's)")) -> None:
    """Measure rate, rhythm, axis, PR/QRS/QT/QTc, ST per lead and the STEMI criteria of each ECG.

    One object per input (--format json); an input that cannot be measured gets its one-line `error` (also on
    stderr) and the others go on. Exit code 2 if any failed."""
    import json

    from rag_ecg.measure.inputs import measure_input
    from rag_ecg.measure.result import failed

    if fmt not in ("table", "json"):
        raise InputError(f"--format {fmt!r} is not one of table, json")
    sex = _sex(sex)
    results = []
    for path in inputs:
        try:
            results.append(measure_input(path, sex=sex, age=age, speed_mm_s=speed, gain_mm_mv=gain).to_dict())
        except (RagEcgError, *USER_FILE_ERRORS) as exc:
            line = " ".join(str(exc).split()) or type(exc).__name__
            line = line if str(path) in line or path.name in line else f"{path}: {line}"
            err.print(f"[red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)
            results.append(failed(str(path), line))
    if fmt == "json":
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        table = Table(title="measurements (ms, bpm; not for clinical use)")
        for col in ("input", "HR", "irreg.", "axis°", "PR", "QRS", "QT", "QTcB", "QTcF", "STEMI criteria / error"):
            table.add_column(col, justify="left" if col in ("input", "STEMI criteria / error") else "right")
        show = lambda v: "-" if v is None else str(v)  # noqa: E731
        for r in results:
            if r["error"]:
                table.add_row(Path(r["input"]).name, *[""] * 8, f"[red]{r['error']}[/]")
                continue
            stemi = "[bold red]" + ", ".join(r["stemi_criteria"]) + "[/]" if r["stemi_criteria"] else "no"
            table.add_row(Path(r["input"]).name, show(r["heart_rate_bpm"]), show(r["rr_irregular"]), show(r["qrs_axis_deg"]),
                          show(r["pr_ms"]), show(r["qrs_ms"]), show(r["qt_ms"]), show(r["qtc_bazett_ms"]),
                          show(r["qtc_fridericia_ms"]), stemi)
        console.print(table)
    if any(r["error"] for r in results):
        raise typer.Exit(2)


@app.command("train-encoder")
def train_encoder(config: Path = typer.Option(Path("training/configs/encoder_cpu.yaml"), help="YAML config"),
                  set_: list[str] = typer.Option([], "--set", help="override a config field: key=value"),
                  db: Optional[str] = DbOpt) -> None:
    """Train the CLIP-style ECG encoder (contrastive, resumable); prints the checkpoint folder."""
    from training.train_encoder import main

    overrides = list(set_) + ([f"db={db}"] if db else [])
    console.print(f"checkpoint: {main(config, overrides)}", soft_wrap=True)  # a path: never cut in two


@app.command("train-segmenter")
def train_segmenter(config: Path = typer.Option(Path("training/configs/segmenter.yaml"), help="YAML config"),
                    set_: list[str] = typer.Option([], "--set", help="override a config field: key=value"),
                    export: bool = typer.Option(False, help="also write the shipped weights "
                                                "(rag_ecg/paper/weights)")) -> None:
    """Train the trace segmenter on rendered pages' pixel-exact trace masks; prints the weights file."""
    from training.train_segmenter import main

    console.print(f"segmenter: {main(config, list(set_), export)}", soft_wrap=True)


@app.command("eval-encoder")
def eval_encoder(checkpoint: Path, db: Optional[str] = DbOpt,
                 presets: str = typer.Option("random,clean", help="query presets, comma-separated"),
                 k: int = 10, out: Optional[Path] = typer.Option(None, help="write the metrics JSON here")) -> None:
    """Fold-9 queries vs the folds 1-8 library: recall@k and kNN superclass AUC/F1/Hamming."""
    import json

    from rag_ecg.eval.encoder_eval import flat_metrics
    from training.train_encoder import evaluate_checkpoint, summarize

    result = evaluate_checkpoint(checkpoint, db=db, presets=presets.split(","), k=k)
    console.print(summarize(result))
    if out:
        out.write_text(json.dumps(flat_metrics(result), indent=2) + "\n")


@app.command("build-index")
def build_index_cmd(encoder: Path = typer.Option(..., help="encoder checkpoint folder"),
                    name: str = typer.Option("default", help="index name (folder index/<name>)"),
                    db: Optional[str] = DbOpt, out: Optional[Path] = typer.Option(None, help="index folder"),
                    split: str = typer.Option("train", help="PTB-XL splits to include, comma-separated, or all"),
                    source: Optional[str] = typer.Option(None, help="sources to include, comma-separated"),
                    preset: str = "clean", renders_per_case: int = 1, kind: str = "auto",
                    limit: Optional[int] = None) -> None:
    """Render, embed and index the reference library (resumes an interrupted build)."""
    from index.build import BuildConfig, build_index

    cfg = BuildConfig(splits=None if split == "all" else split.split(","),
                      include_unsplit=split == "all", sources=source.split(",") if source else None,
                      preset=preset, renders_per_case=renders_per_case, index={"kind": kind}, limit=limit)
    folder = build_index(_store(db), encoder, name=name, out_dir=out, cfg=cfg)
    console.print(f"index: {folder}")


def _query_evidence(query: Optional[Path], text: Optional[str], index: str, db: Optional[str], k: int,
                    source: Optional[str]):
    from rag_ecg.data.images import load_image
    from rag_ecg.data.records import read_wfdb
    from rag_ecg.paper.digitize import DigitizeError
    from rag_ecg.paper.render import render_page
    from rag_ecg.search.retrieve import MANIFEST, Retriever
    from rag_ecg.search.text_search import TextSearch

    if text:  # words fused with the index's text tower over its library; the store's words alone without one
        store, folder = _store(db), _index_dir(index)
        tower = Retriever.open(folder, store) if (folder / MANIFEST).exists() else None
        return TextSearch(store, tower).search(text, k, source=source), None
    retriever = Retriever.open(_index_dir(index), _store(db))
    if query is None:
        raise InputError("give a QUERY (image, PDF or WFDB record) or --text")
    if query.suffix == ".hea" or query.with_suffix(".hea").exists() and not query.suffix:
        image = render_page(read_wfdb(query), preset="clean", dpi=retriever.manifest["build"]["dpi"])
    else:
        image = load_image(query)
    try:
        return retriever.search_images([image], k, source=source)[0], image
    except DigitizeError as exc:  # the trace encoder found no ECG traces on the picture: name the file
        raise DigitizeError(f"{query}: {exc}") from None


@app.command()
def search(query: Optional[Path] = typer.Argument(None, help="image (PNG/JPEG/TIFF/BMP/PDF) or WFDB record"),
           text: Optional[str] = typer.Option(None, "--text", help="search by report text instead"),
           index: str = typer.Option("default", help="index name or folder"), db: Optional[str] = DbOpt,
           k: int = 8, source: Optional[str] = typer.Option(None, help="only cases from this source"),
           fmt: str = typer.Option("table", "--format", help="table | json | html"),
           out: Optional[Path] = typer.Option(None, help="write the json/html here")) -> None:
    """Find the most similar reference cases, with their reports and the label evidence."""
    import json

    evidence, image = _query_evidence(query, text, index, db, k, source)
    if fmt == "json":
        body = json.dumps(evidence.to_dict(), indent=2, default=str)
    elif fmt == "html":
        from rag_ecg.reader.backends import get_backend
        from rag_ecg.reader.interpret import interpret
        from rag_ecg.reader.report_render import render_html

        report = interpret(image, evidence, get_backend("retrieval"))
        body = render_html(report, query_image=image, neighbours=evidence.neighbours,
                           case_images={n.case_id: n.image_path for n in evidence.neighbours if n.image_path})
    else:
        table = Table(title=f"{len(evidence.neighbours)} nearest cases")
        for col in ("case", "score", "source:id", "age/sex", "superclasses", "report"):
            table.add_column(col)
        for n in evidence.neighbours:
            table.add_row(str(n.case_id), f"{n.score:.3f}", f"{n.source}:{n.external_id}",
                          f"{n.age if n.age is not None else '?'}/{n.sex or '?'}", " ".join(n.labels),
                          (n.report or "")[:70])
        console.print(table)
        console.print("votes: " + ", ".join(f"{lab} {p:.2f}" for lab, p in evidence.superclass_scores.items()))
        return
    if out:
        out.write_text(body)
        console.print(f"written {out}")
    else:
        print(body)


@app.command()
def report(query: Path = typer.Argument(..., help="ECG image (PNG/JPEG/TIFF/BMP/PDF) or WFDB record"),
           backend: Optional[str] = BackendOpt, backend_config: Optional[Path] = BackendConfigOpt,
           index: str = typer.Option("default", help="index name or folder"), db: Optional[str] = DbOpt,
           k: int = 8, fmt: str = typer.Option("text", "--format", help="text | json | html"),
           out: Optional[Path] = None,
           base_url: Optional[str] = typer.Option(None, help="vllm: server URL, e.g. http://127.0.0.1:8000/v1"),
           model: Optional[str] = typer.Option(None, help="vllm: served model name"),
           model_path: Optional[str] = typer.Option(None, help="hf: local LLaVA-NeXT folder"),
           max_tokens: Optional[int] = MaxTokensOpt, no_cot: bool = NoCotOpt,
           max_cases: Optional[int] = MaxCasesOpt, sex: Optional[str] = SexOpt, age: Optional[float] = AgeOpt) -> None:
    """A grounded report for one ECG image, citing the retrieved cases it relied on."""
    from rag_ecg.reader.interpret import report_command

    sex = _sex(sex)
    name, opts = _reader(backend_config, backend, max_tokens, no_cot, max_cases, base_url=base_url, model=model,
                         model_path=model_path)
    evidence, image = _query_evidence(query, None, index, db, k, None)
    text = report_command(query if image is None else image, evidence, backend=name, fmt=fmt, out=out,
                          backend_options=opts, measure_from=query, sex=sex, age=age)
    print(text) if out is None else console.print(f"written {out}")


@app.command()
def review(input: str = typer.Argument(..., help="folder, CSV with a path column, or store:source=ptbxl,fold=9"),
           out: Path = typer.Option(..., "--out", help="output folder (results.csv/jsonl, index.html)"),
           backend: Optional[str] = BackendOpt, backend_config: Optional[Path] = BackendConfigOpt,
           index: str = typer.Option("default", help="index name or folder"),
           workers: int = 2, engine: str = typer.Option("local", help="local | ray"), k: int = 8,
           batch_size: int = 16, limit: Optional[int] = None, db: Optional[str] = DbOpt,
           base_url: Optional[str] = None, model: Optional[str] = None, model_path: Optional[str] = None,
           max_tokens: Optional[int] = MaxTokensOpt, no_cot: bool = NoCotOpt, max_cases: Optional[int] = MaxCasesOpt,
           retry_errors: bool = False) -> None:
    """Batch chart review: resumable, one row per chart, with an HTML page to skim."""
    from rag_ecg.review.run import review as run_review

    name, opts = _reader(backend_config, backend, max_tokens, no_cot, max_cases, base_url=base_url, model=model,
                         model_path=model_path)
    s = run_review(input, out, store=db, index_dir=index, backend=name, backend_options=opts, k=k,
                   workers=workers, batch_size=batch_size, engine=engine, limit=limit, retry_errors=retry_errors)
    console.print(s.text(), soft_wrap=True)  # whole output paths, one a line, whatever the width


@app.command("review-import")
def review_import(csv_file: Path = typer.Argument(..., help="verdicts CSV exported from a review page"),
                  db: Optional[str] = DbOpt) -> None:
    """Store a review page's exported verdicts (agree / disagree / comment) with their job; re-render its page."""
    from rag_ecg.review.verdicts import import_verdicts, rerender_page

    store = _store(db)
    res = import_verdicts(store, csv_file)
    page = rerender_page(store, res.job_id)
    console.print(f"job {res.job_id}: {res.added} verdict(s) added, {res.updated} updated, {res.unchanged} unchanged",
                  soft_wrap=True)
    console.print(f"page: {page}" if page else f"page not re-rendered: {res.out_dir} is gone", soft_wrap=True)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(7860, help="TCP port"),
          backend: str = typer.Option("retrieval", help="retrieval | hf | vllm"),
          index: str = typer.Option("default", help="index name or folder"), db: Optional[str] = DbOpt,
          k: int = 8, base_url: Optional[str] = typer.Option(None, help="vllm: server URL"),
          model: Optional[str] = typer.Option(None, help="vllm: served model name"),
          model_path: Optional[str] = typer.Option(None, help="hf: local LLaVA-NeXT folder"),
          no_cot: bool = typer.Option(False, help="short prompt (small context windows)"),
          max_cases: Optional[int] = typer.Option(None, help="cases shown to the LLM"),
          max_upload_mb: float = typer.Option(25.0, help="largest upload accepted, MB")) -> None:
    """The local web app: upload an ECG picture, PDF or WFDB record (or pick an example) and see its digitised
    traces, measurements, similar cases and grounded report; download the report and the digitised record."""
    from rag_ecg.app.server import serve as run_server

    opts = {k_: v for k_, v in dict(base_url=base_url, model=model, model_path=model_path).items() if v}
    run_server(_index_dir(index), db, host=host, port=port, backend=backend, backend_options=opts, k=k,
               cot=not no_cot, max_cases=max_cases, max_upload_mb=max_upload_mb)


@app.command("eval")
def eval_cmd(data: Path = typer.Option(..., help="PTB-XL-like folder, LUDB-like folder of WFDB records, or a "
                                       "CSV (path, labels) of labelled images"),
             split: Optional[str] = typer.Option(None, help="PTB-XL: val (fold 9, default), test, train, all, or folds "
                                                 "like 9,10; ignored for other layouts"),
             presets: str = typer.Option("clean,scan,photo", help="how records are drawn, comma-separated"),
             index: str = typer.Option("default", help="index name or folder"),
             out: Optional[Path] = typer.Option(None, "--out", help="output folder (default data/eval/<set>)"),
             backend: Optional[str] = BackendOpt, backend_config: Optional[Path] = BackendConfigOpt,
             base_url: Optional[str] = None, model: Optional[str] = None, model_path: Optional[str] = None,
             max_tokens: Optional[int] = MaxTokensOpt, no_cot: bool = NoCotOpt, max_cases: Optional[int] = MaxCasesOpt,
             threshold: Optional[float] = typer.Option(None, help="retrieval reader vote threshold (default: the "
                                                       "index's per-label F1-best thresholds)"),
             k: int = 8, workers: int = 2, limit: Optional[int] = None, db: Optional[str] = DbOpt) -> None:
    """The whole pipeline on a labelled set under each preset: ECGBench metrics, report F1, citation validity."""
    from rag_ecg.eval.pipeline import TABLE_COLUMNS, EvalConfig, load_labelled, run_eval, table_rows

    backend, opts = _reader(backend_config, backend, max_tokens, no_cot, max_cases, base_url=base_url, model=model,
                            model_path=model_path)
    if backend == "retrieval":
        opts["threshold"] = threshold if threshold is not None else opts.get("threshold")
    labelled = load_labelled(data, split, limit)
    slug = "".join(ch if ch.isalnum() else "-" for ch in labelled.name).strip("-")
    out = out or paths.data_dir() / "eval" / slug
    cfg = EvalConfig(presets=[p.strip() for p in presets.split(",") if p.strip()], backend=backend,
                     backend_options=opts, k=k, workers=workers)
    res = run_eval(labelled, out, _store(db), index, cfg)
    table = Table(title=f"{res['set']}: {res['charts']} charts, {backend} reader (PTB-XL superclasses)")
    for col in ["preset", "charts"] + [name for _, name in TABLE_COLUMNS]:
        table.add_column(col, justify="left" if col == "preset" else "right", overflow="fold")
    for row in table_rows(res):
        table.add_row(*row)
    console.print(table)
    for preset, m in res["presets"].items():
        if m.get("review_html"):
            console.print(f"{preset}: {m['review_html']}")
    console.print(f"written {out / 'eval.json'} and {out / 'eval.md'}")


@app.command("calibrate")
def calibrate_cmd(data: Optional[Path] = typer.Option(None, help="your labelled charts: PTB-XL-like folder, LUDB-like "
                                                      "folder of WFDB records, or a CSV (path, labels) of pictures"),
                  index: str = typer.Option("default", help="index name or folder"),
                  preset: str = typer.Option("photo", help="how WFDB records are drawn before they are read "
                                             "(pictures are read as they are)"),
                  split: Optional[str] = typer.Option(None, help="PTB-XL folds, as in `eval`"),
                  limit: Optional[int] = None, workers: int = 2,
                  reset: bool = typer.Option(False, "--reset", help="remove the index's site calibration"),
                  db: Optional[str] = DbOpt) -> None:
    """Refit the reader's probabilities and thresholds on your own labelled charts (a site calibration).

    Fit on charts you will not evaluate on; `--reset` goes back to the build's calibration."""
    from index.site_calibration import fit_site, reset_site
    from rag_ecg.eval.pipeline import load_labelled
    from rag_ecg.review.run import resolve_index_dir

    idx = resolve_index_dir(index)
    if reset:
        console.print(f"{idx}: " + ("site calibration removed" if reset_site(idx) else "had no site calibration"))
        return
    if data is None:
        raise InputError("calibrate: give --data (your labelled charts) or --reset")
    labelled = load_labelled(data, split, limit)
    out = fit_site(labelled, idx, _store(db), preset=preset, workers=workers)
    for line in out["unread"]:
        err.print(f"[yellow]unread:[/] {line}", highlight=False)
    th = out["calibration"].get("thresholds") or {}
    console.print(f"{idx}: calibrated on {out['charts']} charts of {out['set']}; refitted "
                  f"{', '.join(out['refitted']) or 'nothing'}; thresholds "
                  + ", ".join(f"{k} {v:.2f}" for k, v in th.items()))


@app.command("build-instructions")
def build_instructions(config: Optional[Path] = None, db: Optional[str] = DbOpt,
                       out: Optional[Path] = None, index: Optional[str] = typer.Option(None, help="index for evidence"),
                       encoder: Optional[Path] = None, limit: Optional[int] = None, seed: Optional[int] = None,
                       evidence_share: Optional[float] = None) -> None:
    """LLaVA-format instruction data (four task families, retrieved-case evidence) from the case store."""
    from training.build_instructions import main

    manifest = main(config, db_url=db, out_dir=out, index_dir=_index_dir(index) if index else None,
                    encoder_dir=encoder, limit=limit, seed=seed, evidence_share=evidence_share)
    console.print(f"manifest: {manifest}")


@app.command()
def finetune(config: Path = typer.Option(..., help="e.g. training/configs/lora_tiny_cpu.yaml"),
             model_path: Optional[str] = typer.Option(None, help="local LLaVA-NeXT (e.g. converted PULSE-7B)"),
             set_: list[str] = typer.Option([], "--set", help="override a config field: key=value")) -> None:
    """LoRA fine-tune of a LLaVA-NeXT model (PULSE-7B) on instruction data; resumable."""
    from training.finetune_llm import main

    console.print(f"run: {main(config, list(set_) + ([f'model_path={model_path}'] if model_path else []))}")


@app.command("convert-pulse", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)  # --help goes to the converter's own parser, which knows the arguments
def convert_pulse(ctx: typer.Context) -> None:
    """Convert PULSE-7B (LLaVA repo layout) to the Hugging Face LLaVA-NeXT layout vLLM loads (see --help)."""
    from training.convert_pulse import main

    console.print(f"converted: {main(list(ctx.args), prog='cli.py convert-pulse')}")



@app.command()
def quickstart(data: Path = typer.Option(None, help="folder holding ptbxl/ and/or ludb/ (default: ../shared/data)"),
               db: Optional[str] = DbOpt,
               encoder: Optional[Path] = typer.Option(None, help="use this encoder checkpoint (default: the shipped one)"),
               retrain: bool = typer.Option(False, "--retrain", help="train the CPU encoder instead of using the "
                                            "shipped one (time-capped by --minutes; reused on later runs)"),
               minutes: float = typer.Option(8.0, help="training time cap for the CPU encoder (--retrain)"),
               charts: int = typer.Option(60, help="fold-9 PTB-XL records to review as photographed charts")) -> None:
    """The whole pipeline on the embedded defaults: ingest, the shipped encoder (or --retrain), build the index,
    review fold-9 records rendered as `photo` charts with the retrieval reader, print metrics."""
    from index.quickstart import run

    store = _store(db)
    res = run(store, data or paths.shared_data_dir(), encoder=encoder, minutes=minutes, charts=charts,
              retrain=retrain)
    print_summary(store)
    from rag_ecg.eval.pipeline import TABLE_COLUMNS, figure

    m = res["metrics"]
    table = Table(title=f"retrieval reader on {m.get('charts', 0)} fold-9 photo charts (PTB-XL superclasses)")
    cols = [(key, name) for key, name in TABLE_COLUMNS if m.get(key) is not None]
    for _, name in cols:
        table.add_column(name, justify="right", overflow="fold")  # intervals wrap, never cut
    if m.get("charts"):
        table.add_row(*[figure(m, key) for key, _ in cols])  # with its bootstrap 95 % interval
    console.print(table)
    console.print(f"review page: {res['review_html']}")
    console.print("more: python cli.py eval --data ../shared/data/ptbxl (clean/scan/photo), "
                  "python cli.py eval --data ../shared/data/ludb (out of domain)")


if __name__ == "__main__":
    sys.exit(app())
