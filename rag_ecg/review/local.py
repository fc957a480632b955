"""The local engine: loader processes feed batched embedding, search and reporting; each batch is committed.

Also the progress bar both engines draw (charts/s, errors, ETA).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from rag_ecg.data.store import Store
from rag_ecg.review.config import ReviewConfig
from rag_ecg.review.jobs import Lease, case_meta, commit_results, pending_batches, start_attempts
from rag_ecg.review.loader import Loader, LoadTask
from rag_ecg.review.pipeline import ChartPipeline, ChartResult, check_backend


class _Rate(ProgressColumn):
    """Charts per second."""

    def render(self, task):
        return Text(f"{task.speed:.1f} charts/s" if task.speed else "- charts/s")


class ReviewProgress:
    """A rich progress bar with charts/s and ETA (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), disable=not enabled, transient=False)
        self.task = self.bar.add_task(description, total=total, completed=completed, errors=0)
        self.errors = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, results: Sequence[ChartResult]) -> None:
        self.errors += sum(r.status == "error" for r in results)
        self.bar.update(self.task, advance=sum(r.status != "pending" for r in results), errors=self.errors)


def run_local(pipeline: ChartPipeline, store: Store, job_id: int, out_dir: Path, cfg: ReviewConfig,
              on_results: Callable[[list[ChartResult]], None], lease: Lease | None = None) -> None:
    """The local engine: loader processes feed batched embedding, search and reporting; commit per batch
    (each batch claimed and committed only while `lease` still holds the job)."""
    loader = Loader(cfg.workers)
    # loader processes take `workers` cores: torch's OpenMP threads spin-wait badly when oversubscribed
    threads = torch.get_num_threads()
    if cfg.workers > 1 and pipeline.spec.device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, min(threads, cores - cfg.workers)))

    def task_batches() -> Iterator[tuple[list, list[LoadTask]]]:
        for batch in pending_batches(store, job_id, cfg.batch_size):
            meta = case_meta(store, [b[1] for b in batch])
            yield batch, [pipeline.load_task(i, key, path, meta.get(key)) for i, key, path, _ in batch]

    try:
        for batch, loaded in loader.batches(task_batches()):
            gave_up = start_attempts(store, batch, cfg.max_attempts, lease)
            skip = {r.item_id for r in gave_up}
            results = pipeline.process([x for x in loaded if x.item_id not in skip]) + gave_up
            commit_results(store, out_dir, results, lease)
            on_results(results)
            check_backend(pipeline.spec.backend, results)
    finally:
        loader.close()
        torch.set_num_threads(threads)
