"""The encoder recipe's data: cases of the store's folds with signals in memory, pages rendered afresh per
(epoch, record), and the batch sampler that streams every remaining epoch to the DataLoader workers."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from sqlalchemy import select

from rag_ecg.data.store import Case, load_case_record, open_store, scp_descriptions
from rag_ecg.encoder.text import case_text
from rag_ecg.errors import ConfigError, InputError
from rag_ecg.eval.metrics import labels_to_matrix
from rag_ecg.paper.render import render_page
from training.encoder_config import EncoderTrainConfig

VAL_STREAM = 1 << 30  # the "epoch" of the fixed validation renders (no training epoch gets there)
_CASE_FIELDS = ("source", "external_id", "signal_path", "patient_id", "age", "sex", "report", "codes", "labels",
                "fold")


@dataclass
class CaseSet:
    """Records of one split with what training needs precomputed (text tokens, label matrix)."""

    records: list  # ECGRecord, signals in memory
    texts: list[str]  # case_text of each record
    labels: np.ndarray  # (n, 5) uint8 superclass indicators
    keys: list[str]  # "source:external_id" (for the data hash)


def load_cases(cfg: EncoderTrainConfig, folds: Sequence[int], limit: int | None, descriptions: dict | None = None,
               store=None) -> tuple[CaseSet, dict[str, str]]:
    """Read the cases of `folds` (and `cfg.sources`) from the store, signals included."""
    own = store is None
    store = store or open_store(cfg.db)
    try:
        with store.session() as s:
            q = select(Case).where(Case.fold.in_(list(folds))).order_by(Case.id)
            if cfg.sources:
                q = q.where(Case.source.in_(list(cfg.sources)))
            cases = list(s.scalars(q))
            if descriptions is None:
                descriptions = scp_descriptions(s)
    finally:
        if own:
            store.dispose()
    if limit:
        cases = cases[:limit]
    if not cases:
        raise InputError(f"{store!r}: no cases of source(s) {cfg.sources} in fold(s) {list(folds)} "
                         "(run `python cli.py ingest ptbxl ...` first)")
    records = _load_records(cases, processes=os.cpu_count() or 1)
    texts = [case_text(r.report, r.codes, descriptions) for r in records]
    labels = labels_to_matrix([r.labels for r in records])
    keys = [f"{c.source}:{c.external_id}" for c in cases]
    return CaseSet(records, texts, labels, keys), descriptions


def _load_one(fields: dict):
    return load_case_record(SimpleNamespace(**fields))


def _load_records(cases, processes: int) -> list:
    """Signals of the cases (WFDB reads dominate start-up: spread them over processes)."""
    rows = [{k: getattr(c, k) for k in _CASE_FIELDS} for c in cases]
    if processes <= 1 or len(rows) < 64:
        return [_load_one(r) for r in rows]
    with mp.get_context("fork").Pool(processes) as pool:
        return pool.map(_load_one, rows, chunksize=32)


def data_hash(train_keys: Sequence[str], val_keys: Sequence[str]) -> str:
    """What the run trained and validated on, as one hash (stamped into the checkpoint)."""
    blob = json.dumps({"train": sorted(train_keys), "val": sorted(val_keys)}).encode()
    return hashlib.sha256(blob).hexdigest()


def render_seed(seed: int, epoch: int, index: int) -> int:
    """The render seed of one (epoch, record): independent streams, stable across runs and workers."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 0x7FFFFFFF)


class RenderedPages:
    """Map-style dataset: (epoch, index) -> (model input from `preprocess.pixels`, tokens (L,) int64,
    labels (5,) float32).

    Each key renders its record afresh with a seed from (seed, epoch, index), so an epoch never repeats
    a page and a resumed run redraws exactly the pages it would have. For a trace tower a seeded share
    (`signal_fraction`) skips the page and reads the record's signal in a random printed layout: the
    tower sees clean and digitised traces of the same ECGs, ~100x cheaper than a render.
    """

    def __init__(self, cases: CaseSet, tokens, preprocess, preset: str, clean_fraction: float, dpi: int, seed: int,
                 signal_fraction: float = 0.0):
        self.cases, self.tokens, self.preprocess = cases, tokens, preprocess
        self.preset, self.clean_fraction, self.dpi, self.seed = preset, clean_fraction, dpi, seed
        # only a trace tower can read a signal directly; image towers always get rendered pages
        self.signal_fraction = signal_fraction if hasattr(preprocess, "from_signal") else 0.0

    def __len__(self) -> int:
        return len(self.cases.records)

    def page(self, epoch: int, index: int):
        s = render_seed(self.seed, epoch, index)
        preset = self.preset
        if self.clean_fraction and random.Random(s).random() < self.clean_fraction:
            preset = "clean"
        return render_page(self.cases.records[index], preset=preset, seed=s, dpi=self.dpi)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = render_seed(self.seed, epoch, index)
        if self.signal_fraction and random.Random(s ^ 0x5167).random() < self.signal_fraction:
            pixels = self.preprocess.from_signal(self.cases.records[index], np.random.default_rng(s))
        else:
            pixels = self.preprocess.pixels(self.page(epoch, index), strict=False)
        return (torch.from_numpy(pixels), self.tokens[index],
                torch.from_numpy(self.cases.labels[index].astype(np.float32)))


def render_fixed(cases: CaseSet, preprocess, preset: str, dpi: int, seed: int) -> np.ndarray:
    """Validation pages rendered once with fixed seeds: model inputs stacked, (n, ...) as `preprocess.pixels`."""
    return np.stack([preprocess.pixels(render_page(r, preset=preset, seed=render_seed(seed, VAL_STREAM, i), dpi=dpi),
                                       strict=False)
                     for i, r in enumerate(cases.records)])


class EpochBatches:
    """Batch sampler over all remaining epochs: lists of (epoch, index), a fresh permutation per epoch,
    sharded by rank, full batches only (every rank takes the same number of steps)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_epoch: int, epochs: int, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_epoch, self.epochs, self.rank, self.world = start_epoch, epochs, rank, world
        self.steps_per_epoch = (n // world) // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{n} training cases cannot fill one batch of {batch_size} per process "
                              f"({world} process(es)): lower batch_size")

    def __len__(self) -> int:
        return (self.epochs - self.start_epoch) * self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start_epoch, self.epochs):
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = perm[self.rank::self.world][: self.steps_per_epoch * self.batch_size]
            for b in range(self.steps_per_epoch):
                yield [(epoch, int(i)) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


def worker_init(_: int) -> None:
    """DataLoader render worker: renders are numpy/Pillow; leave the cores to the trainer."""
    torch.set_num_threads(1)
