"""Batch chart review, the entry point: a folder, CSV or store query of charts -> a durable job -> outputs.

Why this shape: a hospital backlog is thousands of charts and a run may die at any moment (kill -9, a
reboot, a broken backend). Each chart is one `ReviewItem`; a batch's results and its `done`/`error`
statuses are written in one transaction, so a re-run of the same command finds the same job (its key
hashes the input and the settings that change results) and only does what is still pending. Outputs
(`results.csv`, `results.jsonl`, `index.html` + `thumbs/`, `manifest.json`) are regenerated from the
store at the end of every run, so they are complete after a resume.

Per chart: load/validate (worker processes) -> embed (batched) -> search -> not-an-ECG check ->
report (backend; concurrent calls for vLLM) -> store row. `engine="ray"` runs the same stages on Ray Data
(`rag_ecg.review.ray_engine`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from rag_ecg import __version__, paths
from rag_ecg.data.store import Store, open_store
from rag_ecg.paper.presets import PRESETS
from rag_ecg.redact import redact
from rag_ecg.review.config import STAGES, THUMBS, ReviewConfig, ReviewError
from rag_ecg.review.inputs import discover
from rag_ecg.review.jobs import (add_items, job_key, last_version, lease_owner, mark_done, open_job, reject_items,
                                 release_lease, renew_lease, reset_errors, status_counts, take_lease)
from rag_ecg.review.local import ReviewProgress, run_local
from rag_ecg.review.outputs import write_outputs
from rag_ecg.review.pipeline import ChartPipeline, ChartResult, PipelineSpec
from rag_ecg.io import read_json
from rag_ecg.search.calibration import SITE_CALIBRATION
from rag_ecg.search.index_folder import check_store
from rag_ecg.search.retrieve import MANIFEST, IndexNotReadyError

log = logging.getLogger(__name__)


@dataclass
class ReviewSummary:
    """What a run did and where its outputs are (the CLI prints it)."""

    job_id: int
    key: str  # the job key (hash of input + result settings)
    input: str
    out_dir: Path
    total: int  # charts in the job
    done: int
    error: int
    pending: int  # left for the next run (backend failures)
    unparsed: int  # the reader answered, but not with a report (kept verbatim; retried with retry_errors)
    processed: int  # charts finished (done or error) by this run
    resumed: bool  # the job existed before this run
    elapsed_s: float  # wall time of this run's chart processing
    charts_per_s: float  # processed / elapsed_s
    stage_s: dict[str, float] = field(default_factory=dict)  # summed per-chart seconds per stage, this run
    outputs: dict[str, str] = field(default_factory=dict)  # name -> file path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d

    def text(self) -> str:
        """What the CLI prints after a run."""
        what = "resumed job" if self.resumed else "new job"
        lines = [f"{what} {self.job_id} ({self.key[:12]}): {self.total} charts: {self.done} done, "
                 f"{self.unparsed} unparsed, {self.error} error, {self.pending} pending",
                 f"this run: {self.processed} charts in {self.elapsed_s:.1f}s ({self.charts_per_s:.1f} charts/s)"]
        if self.processed:
            total = sum(self.stage_s.values()) or 1.0
            lines.append("time per stage: " + ", ".join(f"{k} {v / total:.0%}" for k, v in self.stage_s.items()))
        if self.pending:
            lines.append("charts left pending (the backend failed): fix it and run the same command again")
        if self.unparsed:
            lines.append("charts whose answer was not a report are marked unparsed: --retry-errors asks again")
        lines += [f"{name}: {path}" for name, path in self.outputs.items()]
        return "\n".join(lines)


@dataclass
class BatchReport:
    """Handed to `on_batch` after each committed batch."""

    results: list[ChartResult]
    committed: int  # charts finished by this run so far


def index_info(index_dir: Path) -> dict:
    """The index identity that changes results (path, encoder hash, build time) and its build dpi."""
    mpath = index_dir / MANIFEST
    if not mpath.exists():
        raise IndexNotReadyError(f"{index_dir}: no finished index here (build it with `python cli.py build-index`)")
    m = json.loads(mpath.read_text())
    site = index_dir / SITE_CALIBRATION
    site_at = read_json(site).get("fitted_at") if site.is_file() else None
    return {"path": str(index_dir.resolve()), "encoder_hash": m.get("encoder_hash"), "built": m.get("built"),
            "calibration": site_at,
            "count": m.get("count"), "dpi": int((m.get("build") or {}).get("dpi") or 100)}


def resolve_index_dir(index: str | Path | None) -> Path:
    """An index folder, or the name of one under `paths.index_dir()` (default: `default`)."""
    if index is None:
        return paths.index_dir() / "default"
    p = Path(index).expanduser()
    if p.is_dir() or len(p.parts) > 1:
        return p
    return paths.index_dir() / str(index)


def review(input: str | Path, out_dir: str | Path, store: Store | str | None = None,
           index_dir: str | Path | None = None, backend: str = "retrieval", k: int = 8, workers: int = 2,
           batch_size: int = 16, engine: str = "local", limit: int | None = None, progress: bool = True,
           backend_options: dict | None = None, preset: str = "clean", device: str = "cpu",
           retry_errors: bool = False, config: ReviewConfig | None = None,
           on_batch: Callable[[BatchReport], None] | None = None) -> ReviewSummary:
    """Review every chart of `input` (a folder, a CSV with a `path` column, or `store:source=..,fold=..`)
    into `out_dir`; re-running the same command resumes the same job. `config` overrides the keyword
    settings; `on_batch` is called after each committed batch (logging, metrics)."""
    cfg = config or ReviewConfig(backend=backend, backend_options=dict(backend_options or {}), k=k,
                                 workers=workers, batch_size=batch_size, engine=engine, limit=limit,
                                 preset=preset, device=device, retry_errors=retry_errors)
    own_store = not isinstance(store, Store)
    st = open_store(store) if own_store else store
    try:
        return _review(input, out_dir, st, index_dir, cfg, progress, on_batch)
    finally:
        if own_store:
            st.dispose()


def _review(input, out_dir, st: Store, index_dir, cfg: ReviewConfig, progress: bool,
            on_batch: Callable[[BatchReport], None] | None) -> ReviewSummary:
    out = Path(out_dir).expanduser().resolve()
    idx_dir = resolve_index_dir(index_dir)
    info = index_info(idx_dir)
    check_store(idx_dir, st)  # before a job is opened: the index's case ids must name the same ECGs here
    if cfg.preset not in PRESETS:
        raise ReviewError(f"render preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    if cfg.dpi is None:
        cfg = replace(cfg, dpi=info["dpi"])  # draw WFDB / store charts like the index's pages
    descriptor, charts = discover(input, st, out, cfg.limit)
    key = job_key(descriptor, cfg, info)
    settings = redact({"review": asdict(cfg), "index": info, "rag_ecg_version": __version__})  # no secrets
    before = last_version(st, key)
    job_id, resumed = open_job(st, key, descriptor, out, settings)
    upgraded = resumed and before is not None and before != __version__
    owner = lease_owner()
    lease = take_lease(st, job_id, owner)  # one run at a time per job (a dead run's lease does not block)
    try:
        add_items(st, job_id, charts)
        if cfg.retry_errors or upgraded:  # a newer reader may read what an older one refused
            if upgraded and not cfg.retry_errors:
                log.info("rag-ecg %s ran this job before (now %s): charts that ended in error are tried again",
                         before, __version__)
            reset_errors(st, job_id)
        reject_items(st, job_id, charts)  # files that are not charts: error rows, never opened
        (out / THUMBS).mkdir(parents=True, exist_ok=True)

        spec = PipelineSpec(index_dir=str(idx_dir.resolve()), store_url=st.url, backend=cfg.backend,
                            backend_options=dict(cfg.backend_options), k=cfg.k, preset=cfg.preset, dpi=int(cfg.dpi),
                            device=cfg.device, workers=max(1, cfg.workers), batch=cfg.batch_size,
                            thumb_width=cfg.thumb_width,
                            image_max_side=cfg.image_max_side)
        counts = status_counts(st, job_id)
        total = sum(counts.values())
        stage_s = {s: 0.0 for s in STAGES}
        processed = 0
        t0 = time.perf_counter()
        pipeline = ChartPipeline(spec, store=st)
        pipeline.needs_image  # an unknown backend name fails here, before any chart is touched
        if cfg.engine == "local" and counts["pending"]:
            pipeline.retriever, pipeline.backend  # open them now, outside the per-chart stage timings
        try:
            if counts["pending"]:
                with ReviewProgress(progress, total, total - counts["pending"], f"review {Path(str(input)).name}") as bar:
                    def on_results(results: list[ChartResult]) -> None:
                        nonlocal processed
                        renew_lease(st, job_id, owner)
                        for r in results:
                            for stage, sec in r.timings.items():
                                stage_s[stage] = stage_s.get(stage, 0.0) + float(sec)
                        processed += sum(r.status != "pending" for r in results)
                        bar.advance(results)
                        if on_batch is not None:
                            on_batch(BatchReport(results, processed))

                    if cfg.engine == "ray":
                        from rag_ecg.review.ray_engine import run_ray

                        run_ray(spec, st, job_id, out, cfg, on_results, lease)
                    else:
                        run_local(pipeline, st, job_id, out, cfg, on_results, lease)
        finally:
            pipeline.close()
            elapsed = time.perf_counter() - t0
            counts = status_counts(st, job_id)
            if counts["pending"] == 0:
                mark_done(st, job_id)
            outputs = write_outputs(st, job_id, out, cfg, idx_dir)
        return ReviewSummary(job_id=job_id, key=key, input=descriptor, out_dir=out, total=sum(counts.values()),
                             done=counts["done"], error=counts["error"], pending=counts["pending"],
                             unparsed=counts["unparsed"],
                             processed=processed, resumed=resumed, elapsed_s=round(elapsed, 3),
                             charts_per_s=round(processed / elapsed, 3) if elapsed > 0 and processed else 0.0,
                             stage_s={k: round(v, 3) for k, v in stage_s.items()},
                             outputs={k: str(v) for k, v in outputs.items()})
    finally:
        release_lease(st, job_id, owner)
