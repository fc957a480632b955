"""Index build job: cases in the store -> rendered pages -> embeddings -> FAISS (images + report texts).

The result is one self-contained folder (`index/<name>/` by default): the encoder checkpoint it was built
with, `images.faiss` and `texts.faiss` (each with its manifest), a small JPEG page per case for people to
look at, and `manifest.json` with the vote calibration. `manifest.json` is written last, so its presence
means "finished". An interrupted build resumes from its last saved chunk without re-embedding what is done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from sqlalchemy import select

from rag_ecg import __version__, paths
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case, Store, load_case_record, scp_descriptions
from rag_ecg.encoder.checkpoint import MANIFEST as ENCODER_MANIFEST
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.encoder.preprocess import TracePreprocess
from rag_ecg.encoder.text import case_text
from rag_ecg.errors import ArtifactError, InputError
from rag_ecg.eval.metrics import choose_thresholds, knn_scores, labels_to_matrix
from rag_ecg.io import atomic_write_with, read_json, write_json
from rag_ecg.paper.render import render_page
from rag_ecg.search.calibration import Calibration, fit_platt
from rag_ecg.search.index_config import IndexConfig
from rag_ecg.search.retrieve import MANIFEST
from rag_ecg.search.vector_index import VectorIndex

log = logging.getLogger(__name__)

STATE = "build_state.json"


@dataclass
class BuildConfig:
    """What goes into an index and how its pages are drawn (saved in the index manifest)."""

    sources: list[str] | None = None  # case sources to include (None: all)
    splits: list[str] | None = field(default_factory=lambda: ["train"])  # PTB-XL splits (None: all); other sources have none
    include_unsplit: bool = False  # also include cases without a split (e.g. LUDB) — off: keep them for out-of-domain tests
    preset: str = "clean"  # artifact preset of the reference pages
    renders_per_case: int = 1  # >1: embed several renders (random layouts/presets) and store their mean
    dpi: int = 100  # render resolution; the encoder sees ~350 px wide pages, so 100 dpi loses nothing
    page_width: int = 1100  # width of the JPEG page kept per case for reports and review pages (0: none)
    batch_size: int = 32  # images per encoder forward pass
    chunk: int = 256  # cases per saved step (what an interruption can cost)
    workers: int = 0  # render processes (0: all cores)
    k: int = 10  # neighbours that vote (calibration is fitted for this k)
    temperature: float = 0.05  # softmax temperature of the vote
    index: dict = field(default_factory=dict)  # IndexConfig fields (kind, nlist, ...)
    limit: int | None = None  # at most this many cases (smoke runs)

    def key(self) -> str:
        """Hash of the settings that change vectors: a resumed build must have the same one."""
        d = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "chunk", "workers", "limit")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def select_cases(store: Store, cfg: BuildConfig) -> list[Case]:
    with store.session() as s:
        q = select(Case).order_by(Case.id)
        if cfg.sources:
            q = q.where(Case.source.in_(cfg.sources))
        cases = list(s.scalars(q))
    if cfg.splits is not None:
        cases = [c for c in cases if c.split in cfg.splits or (cfg.include_unsplit and c.split is None)]
    return cases[: cfg.limit] if cfg.limit else cases


def _render_job(args) -> tuple[int, list, str | None]:
    """Worker: read a case's signal, draw its pages, keep one as a JPEG; returns PIL pages for the encoder."""
    case, preset, n, dpi, page_dir, page_width = args
    try:
        rec = load_case_record(case)
    except ValueError as exc:
        return case.id, [], str(exc)
    pages = []
    for i in range(n):
        seed = int(hashlib.sha256(f"{case.source}:{case.external_id}:{i}".encode()).hexdigest()[:8], 16)
        pages.append(render_page(rec, preset=preset if i == 0 else "random", seed=seed, dpi=dpi))
    if page_dir and page_width:
        _save_jpeg(pages[0], Path(page_dir) / f"{case.id}.jpg", page_width)
    return case.id, pages, None


def _save_jpeg(img, path: Path, width: int) -> None:
    h = round(img.height * width / img.width)
    page = img.resize((width, h)).convert("RGB")
    atomic_write_with(path, lambda tmp: page.save(tmp, "JPEG", quality=85))


def build_index(store: Store, encoder_dir: str | Path, name: str = "default", out_dir: str | Path | None = None,
                cfg: BuildConfig | None = None, progress: bool = True) -> Path:
    """Build (or resume) the index `name`; returns its folder."""
    cfg = cfg or BuildConfig()
    out = Path(out_dir) if out_dir else paths.index_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    encoder = ECGEncoder.load(encoder_dir)
    state_path = out / STATE
    state = read_json(state_path) if state_path.exists() else {}
    if state and (state.get("key") != cfg.key() or state.get("encoder_hash") != encoder.checkpoint_hash):
        log.warning("%s: settings or encoder changed since the last build; starting over", out)
        for f in ("images.faiss", "images.json", "texts.faiss", "texts.json", MANIFEST):
            (out / f).unlink(missing_ok=True)
        state = {}
    (out / MANIFEST).unlink(missing_ok=True)  # not finished until written again
    if not state:
        _copy_encoder(Path(encoder_dir), out / "encoder")
        state = {"key": cfg.key(), "encoder_hash": encoder.checkpoint_hash, "skipped": {}}
        write_json(state_path, state)
    encoder = ECGEncoder.load(out / "encoder")
    if encoder.checkpoint_hash != state["encoder_hash"]:
        raise ArtifactError(f"{out / 'encoder'}: encoder copy does not match the build state; delete {out}")

    cases = select_cases(store, cfg)
    if not cases:
        raise InputError("no cases match the build settings (ingest data first, or change --split/--source)")
    icfg = IndexConfig.from_dict(cfg.index)
    img_path = out / "images.faiss"
    images = (VectorIndex.load(img_path, expected_encoder_hash=encoder.checkpoint_hash) if img_path.exists()
              else VectorIndex(encoder.embed_dim, icfg, encoder_hash=encoder.checkpoint_hash))
    skipped: dict = state.get("skipped", {})
    todo = [c for c in cases if c.id not in images and str(c.id) not in skipped]
    page_dir = out / "pages" if cfg.page_width else None
    if page_dir:
        page_dir.mkdir(exist_ok=True)
    log.info("index %s: %d cases, %d already embedded", name, len(cases), len(cases) - len(todo))
    with _progress(progress) as bar:
        task = bar.add_task("render + embed", total=len(cases), completed=len(cases) - len(todo))
        for chunk in _chunks(todo, cfg.chunk):
            ids, vecs = _embed_chunk(chunk, cfg, encoder, page_dir, skipped)
            if ids:
                images.add(np.array(ids, np.int64), np.stack(vecs))
            images.save(img_path)
            state["skipped"] = skipped
            write_json(state_path, state)
            bar.advance(task, len(chunk))

        with store.session() as s:
            descriptions = scp_descriptions(s)
        done = [c for c in cases if c.id in images]
        texts = VectorIndex(encoder.embed_dim, icfg, encoder_hash=encoder.checkpoint_hash)
        ttask = bar.add_task("report texts", total=len(done))
        for chunk in _chunks(done, 512):
            emb = encoder.embed_texts([case_text(c.report, c.codes or {}, descriptions) for c in chunk])
            texts.add(np.array([c.id for c in chunk], np.int64), emb)
            bar.advance(ttask, len(chunk))
        texts.save(out / "texts.faiss")

    if isinstance(encoder.preprocess, TracePreprocess):  # the digitiser refuses pictures it cannot read traces from
        calibration = calibrate(images, done, cfg, floor=False)
    else:
        calibration = calibrate(images, done, cfg, _artifact_top_scores(images, done, cfg, encoder))
    manifest = {
        "name": name, "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rag_ecg_version": __version__, "encoder_hash": encoder.checkpoint_hash,
        "store": repr(store), "count": images.ntotal, "skipped": skipped, "build": asdict(cfg),
        "calibration": asdict(calibration),
    }
    write_json(out / MANIFEST, manifest)
    log.info("index %s: %d cases embedded, %d skipped -> %s", name, images.ntotal, len(skipped), out)
    return out


def _embed_chunk(chunk: list[Case], cfg: BuildConfig, encoder: ECGEncoder, page_dir, skipped: dict):
    jobs = [(c, cfg.preset, cfg.renders_per_case, cfg.dpi, page_dir, cfg.page_width) for c in chunk]
    workers = cfg.workers or os.cpu_count() or 1
    ids, vecs = [], []
    rendered = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            rendered = list(pool.map(_render_job, jobs, chunksize=4))
    else:
        rendered = [_render_job(j) for j in jobs]
    for start in range(0, len(rendered), cfg.batch_size):
        part = [r for r in rendered[start:start + cfg.batch_size] if r[2] is None]
        for cid, _, err in rendered[start:start + cfg.batch_size]:
            if err:
                skipped[str(cid)] = err
                log.warning("skipped case %s: %s", cid, err)
        if not part:
            continue
        flat = [p for _, pages, _ in part for p in pages]
        emb = encoder.embed_images(flat, strict=False).reshape(len(part), cfg.renders_per_case, -1).mean(axis=1)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids += [cid for cid, _, _ in part]
        vecs += list(emb.astype(np.float32))
    return ids, vecs


def _artifact_top_scores(images: VectorIndex, cases: list[Case], cfg: BuildConfig, encoder,
                         n: int = 48) -> np.ndarray:
    """Best other-patient similarity of library ECGs drawn as photos/scans: what real queries look like."""
    rng = np.random.default_rng(0)
    pick = [cases[i] for i in sorted(rng.choice(len(cases), size=min(n, len(cases)), replace=False))]
    pages, groups = [], []
    for i, c in enumerate(pick):
        try:
            rec = load_case_record(c)
        except ValueError:
            continue
        pages.append(render_page(rec, preset=("photo", "scan", "random")[i % 3], seed=1000 + i, dpi=cfg.dpi))
        groups.append(c.patient_id or f"case{c.id}")
    if not pages:
        return np.zeros(0)
    scores, ids = images.search(encoder.embed_images(pages, strict=False), min(images.ntotal, 32))
    patient = {c.id: c.patient_id or f"case{c.id}" for c in cases}
    return np.array([max((s for s, i in zip(srow, irow) if i >= 0 and patient.get(int(i)) != g), default=-1.0)
                     for srow, irow, g in zip(scores, ids, groups)])


def calibrate(images: VectorIndex, cases: list[Case], cfg: BuildConfig,
              artifact_top: np.ndarray | None = None, floor: bool = True) -> Calibration:
    """Leave-one-patient-out votes on the library -> Platt scaling, F1 thresholds, the not-an-ECG floor.

    `floor=False` for encoders that read traces: their embeddings of real pages crowd into a narrow cone
    (best similarities 0.98-0.999), so a similarity floor refused ~1 % of real out-of-domain pages, and
    the digitiser already refuses pictures with no traces."""
    by_id = {c.id: c for c in cases}
    ids = images.ids
    vecs = images.vectors(ids)
    y = labels_to_matrix([by_id[int(i)].labels or [] for i in ids], SUPERCLASSES)
    groups = [by_id[int(i)].patient_id or f"case{int(i)}" for i in ids]
    if len(ids) < 3:
        return Calibration(temperature=cfg.temperature, k=cfg.k)
    votes = knn_scores(vecs, vecs, y, cfg.k, cfg.temperature, groups, groups)
    platt, thresholds = {}, {}
    for j, lab in enumerate(SUPERCLASSES):
        if 0 < y[:, j].sum() < len(y):
            a, b = fit_platt(votes[:, j], y[:, j])
            platt[lab] = [a, b]
    cal = Calibration(temperature=cfg.temperature, k=cfg.k, platt=platt)
    probs = np.array([[cal.probability(lab, v) for lab, v in zip(SUPERCLASSES, row)] for row in votes])
    for lab, t in zip(SUPERCLASSES, choose_thresholds(y, probs)):
        if np.isfinite(t):
            thresholds[lab] = float(t)
    sims = vecs @ vecs.T
    same = np.array(groups)[:, None] == np.array(groups)[None, :]
    top = np.where(same, -np.inf, sims).max(axis=1)
    if artifact_top is not None and len(artifact_top):
        top = np.concatenate([top, artifact_top])
    # Real ECG pages (clean, and photographed/scanned renders) never fell below this similarity to their
    # nearest other-patient case; allow a margin.
    min_top = float(np.quantile(top, 0.001) - 0.5 * (np.median(top) - np.quantile(top, 0.001)))
    cal.thresholds, cal.min_top_score = thresholds, (min_top if floor else None)
    return cal


def _copy_encoder(src: Path, dst: Path) -> None:
    """A private copy of the checkpoint, file by file, each atomically, its manifest last (it vouches for the
    rest: an interrupted copy is no checkpoint, and the build state that trusts it is written after)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in sorted((p for p in src.iterdir() if p.is_file()), key=lambda p: (p.name == ENCODER_MANIFEST, p.name)):
        atomic_write_with(dst / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)
