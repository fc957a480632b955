"""The batch review on Ray Data: the same per-chart stages as the local engine, spread over a cluster.

Why: a hospital backlog (10^5-10^6 charts) outgrows one machine. The pipeline is
`from_items(pending charts) -> map_batches(load + embed) -> map_batches(search + not-an-ECG check)
-> map_batches(report)`, each stage a pool of actors built from a picklable `PipelineSpec` (so the
encoder, index and backend load once per actor; it holds secrets, so it goes through Ray's object store),
and the driver writes every finished batch to the store in one transaction exactly as the local engine
does: a killed run resumes the same way. With a vLLM server as the backend, the report actors send
concurrent requests (`--workers` each).

Ray is an optional extra (`pip install 'ray[data]==2.60.0'`); this module is imported only for
`engine="ray"`. Connects to `RAY_ADDRESS` when set (a cluster), else starts a local instance; on a
cluster the store must be a server database (PostgreSQL) that every node can reach.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import update

from rag_ecg.data.images import decode_image
from rag_ecg.data.store import ReviewItem, Store
from rag_ecg.errors import BackendError
from rag_ecg.review.config import ReviewConfig, ReviewError
from rag_ecg.review.jobs import Lease, case_meta, claim_pending, commit_results
from rag_ecg.review.loader import load_chart
from rag_ecg.review.pipeline import (ChartPipeline, ChartResult, PipelineSpec, check_backend, finish_result,
                                    open_timings)
from rag_ecg.search.evidence import Evidence


def import_ray():
    """(ray, ray.data), or a ReviewError that says which extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ReviewError(f"engine 'ray' needs Ray Data: pip install 'ray[data]==2.60.0' ({exc})") from None
    return ray, ray.data


def unseal(spec) -> PipelineSpec:
    """An actor's PipelineSpec: a reference into Ray's object store (how `run_ray` hands it over), or a dict."""
    if not isinstance(spec, dict):
        ray, _ = import_ray()
        spec = ray.get(spec)
    return PipelineSpec(**spec)


def _png(image) -> bytes:
    if image is None:
        return b""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _unpng(data: bytes):
    if not data:
        return None
    return decode_image(data, "page")


def _measured(cell) -> dict | None:
    """A chart's measurements as the load stage sent them (JSON text; empty: none)."""
    return json.loads(str(cell)) if cell else None


class LoadEmbed:
    """Actor: load/render each chart of a batch, embed the good ones in one forward pass."""

    def __init__(self, spec):
        self.pipeline = ChartPipeline(unseal(spec))
        self.pipeline.encoder  # load it now, not inside the first batch's timing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        p = self.pipeline
        tasks = [p.load_task(int(i), str(k), str(path), json.loads(str(meta)))
                 for i, k, path, meta in zip(batch["item_id"], batch["key"], batch["path"], batch["meta"])]
        loaded = [load_chart(t) for t in tasks]
        ok = [x for x in loaded if x.error is None]
        emb, t_embed = p.embed([x.pixels for x in ok])
        dim = p.encoder.embed_dim
        out_emb = np.zeros((len(loaded), dim), np.float32)
        row = {x.item_id: j for j, x in enumerate(ok)}
        for n, x in enumerate(loaded):
            if x.item_id in row:
                out_emb[n] = emb[row[x.item_id]]
        return {
            "item_id": np.array([x.item_id for x in loaded], np.int64),
            "key": np.array([x.key for x in loaded], dtype=object),
            "emb": out_emb,
            "error": np.array([x.error or "" for x in loaded], dtype=object),
            "patient": np.array([x.patient_id or "" for x in loaded], dtype=object),
            "thumb": np.array([x.thumb or b"" for x in loaded], dtype=object),
            "full": np.array([x.full or b"" for x in loaded], dtype=object),
            "overlay": np.array([x.overlay or b"" for x in loaded], dtype=object),
            "image": np.array([_png(x.image) for x in loaded], dtype=object),
            "measured": np.array([json.dumps(x.measurements) if x.measurements is not None else ""
                                  for x in loaded], dtype=object),
            "t_load": np.array([x.load_s for x in loaded], np.float64),
            "t_open": np.array([np.nan if x.open_s is None else x.open_s for x in loaded], np.float64),
            "t_embed": np.array([t_embed if x.error is None else 0.0 for x in loaded], np.float64),
        }


class Search:
    """Actor: nearest reference cases + label evidence, and the not-an-ECG check, for a batch."""

    def __init__(self, spec):
        self.pipeline = ChartPipeline(unseal(spec))
        self.pipeline.retriever  # load it now, not inside the first batch's timing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        good = [n for n, e in enumerate(batch["error"]) if not e]
        evs, t_search = self.pipeline.search(np.asarray(batch["emb"], np.float32)[good],
                                             [str(batch["patient"][n]) or None for n in good])
        evidence = np.array([""] * len(batch["item_id"]), dtype=object)
        error = np.array(list(batch["error"]), dtype=object)
        t = np.zeros(len(batch["item_id"]), np.float64)
        for n, ev in zip(good, evs):
            t[n] = t_search
            if isinstance(ev, str):
                error[n] = f"{batch['key'][n]}: {ev}"
            else:
                evidence[n] = json.dumps(ev.to_dict())
        out = {k: v for k, v in batch.items() if k != "emb"}
        out.update(evidence=evidence, error=error, t_search=t)
        return out


class Report:
    """Actor: the reader's report for each chart that has evidence (concurrent calls for vLLM)."""

    def __init__(self, spec):
        self.pipeline = ChartPipeline(unseal(spec))
        self.pipeline.backend  # load it now, not inside the first batch's timing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n_rows = len(batch["item_id"])
        todo = [n for n in range(n_rows) if batch["evidence"][n]]
        evs: list[Evidence] = [Evidence.from_dict(json.loads(batch["evidence"][n])) for n in todo]
        outcomes = self.pipeline.report([(_unpng(batch["image"][n]), ev, _measured(batch["measured"][n]))
                                         for n, ev in zip(todo, evs)])
        status = np.array(["error"] * n_rows, dtype=object)
        error = np.array(list(batch["error"]), dtype=object)
        report = np.array([""] * n_rows, dtype=object)
        neighbours = np.array([""] * n_rows, dtype=object)
        t = np.zeros(n_rows, np.float64)
        for n, ev, (rep, dt) in zip(todo, evs, outcomes):
            res = finish_result(ChartResult(int(batch["item_id"][n]), "error"), str(batch["key"][n]), ev, rep, dt)
            status[n], error[n], t[n] = res.status, res.error or "", dt
            report[n] = json.dumps(res.report) if res.report is not None else ""
            neighbours[n] = json.dumps(res.neighbours)
        out = {k: v for k, v in batch.items() if k not in ("image", "evidence", "measured")}
        out.update(status=status, error=error, report=report, neighbours=neighbours, t_report=t)
        return out

    def __del__(self):
        try:
            self.pipeline.close()
        except Exception:
            pass


def results_from_batch(batch: dict[str, np.ndarray]) -> list[ChartResult]:
    """A finished Ray batch -> ChartResults, timed per stage like the local engine's."""
    out = []
    for n in range(len(batch["item_id"])):
        t_open = float(batch["t_open"][n])
        timings = open_timings(float(batch["t_load"][n]), None if np.isnan(t_open) else t_open)
        for stage in ("embed", "search"):  # zero: the chart did not reach the stage
            if batch[f"t_{stage}"][n] > 0:
                timings[stage] = round(float(batch[f"t_{stage}"][n]), 6)
        if batch["neighbours"][n]:
            timings["report"] = round(float(batch["t_report"][n]), 6)
        status = str(batch["status"][n])
        out.append(ChartResult(
            item_id=int(batch["item_id"][n]), status=status, error=str(batch["error"][n]) or None,
            timings=timings, report=json.loads(batch["report"][n]) if batch["report"][n] else None,
            neighbours=json.loads(batch["neighbours"][n]) if batch["neighbours"][n] else None,
            thumb=bytes(batch["thumb"][n]) or None, full=bytes(batch["full"][n]) or None,
            overlay=bytes(batch["overlay"][n]) or None))
    return out


def ensure_ray(num_cpus: int | None = None):
    """Connect to RAY_ADDRESS (a cluster) or start a local instance, unless Ray is already up."""
    ray, _ = import_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
        if not address and num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address or None, **kwargs)
    return ray


def run_ray(spec: PipelineSpec, store: Store, job_id: int, out_dir: Path, cfg: ReviewConfig,
            on_results: Callable[[list[ChartResult]], None], lease: Lease | None = None) -> None:
    """Review the job's pending charts on Ray Data; the driver commits each finished batch.

    Every pending chart counts one attempt when the run starts; Ray retries failed tasks and restarts
    dead actors itself, so `max_attempts` (the local engine's give-up rule) does not apply here."""
    ray = ensure_ray(num_cpus=max(2, cfg.workers))
    import ray.data as rd

    ctx = rd.DataContext.get_current()  # the review draws its own progress bar
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False

    rows = claim_pending(store, job_id, lease)
    if not rows:
        return
    metas = case_meta(store, [r[1] for r in rows])
    items = [{"item_id": int(i), "key": key, "path": path, "meta": json.dumps(metas.get(key, {}))}
             for i, key, path in rows]
    # Ray records operators' arguments (its export events write them to the session's logs): the spec holds
    # the store URL with its password and the backend's keys, so it goes through the object store and the
    # actors' arguments carry only its reference
    sd = ray.put(asdict(spec))
    workers = max(1, cfg.workers)
    gpu = 1 if spec.device.startswith("cuda") else 0
    report_gpu = 1 if spec.backend == "hf" and str(spec.backend_options.get("device", "")).startswith("cuda") else 0
    ds = (rd.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 64 * workers)))
          .map_batches(LoadEmbed, fn_constructor_kwargs={"spec": sd}, batch_size=cfg.batch_size,
                       compute=rd.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=1, num_gpus=gpu,
                       batch_format="numpy")
          .map_batches(Search, fn_constructor_kwargs={"spec": sd}, batch_size=cfg.batch_size,
                       compute=rd.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=0.25,
                       batch_format="numpy")
          .map_batches(Report, fn_constructor_kwargs={"spec": sd}, batch_size=cfg.batch_size,
                       compute=rd.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=0.25,
                       num_gpus=report_gpu, batch_format="numpy"))
    left = {int(r[0]) for r in rows}
    try:
        for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=1):
            results = results_from_batch(batch)
            commit_results(store, out_dir, results, lease)
            left -= {r.item_id for r in results}
            on_results(results)
            check_backend(spec.backend, results)
    except BackendError:  # stopped for the backend: the charts never reached give their attempt back
        with store.session() as s:
            s.execute(update(ReviewItem).where(ReviewItem.id.in_(sorted(left)), ReviewItem.attempts > 0)
                      .values(attempts=ReviewItem.attempts - 1))
        raise
