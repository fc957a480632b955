"""Index build job: cases in the store -> rendered pages -> embeddings -> FAISS (images + report texts).

The result is one self-contained folder (`index/<name>/` by default): the encoder checkpoint it was built
with, `images.faiss` and `texts.faiss` (each with its manifest), a small JPEG page per case for people to
look at, `cases.json` ((source, external_id) of every indexed case id: what binds the folder to its case
store, checked on open) and `manifest.json` with the vote calibration, written last.

A build never touches the live index: it works in a staging folder beside it (`index/.<name>.build/`) and,
once that is complete, swaps it in with one rename (`rag_ecg.io.replace_dir`), so a crash at any point leaves
the old index or the new one, whole. An interrupted build resumes from its staging folder's last saved chunk;
a rebuild with the same settings and encoder starts from the live index's vectors (hard links), so only new
cases are embedded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
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
from rag_ecg.io import atomic_write_with, read_json, replace_dir, write_json
from rag_ecg.paper.render import render_page
from rag_ecg.search.calibration import Calibration, fit_on_reads, fit_platt, top_quantiles
from rag_ecg.search.index_config import IndexConfig
from rag_ecg.search.index_files import IndexLoadError
from rag_ecg.search.index_folder import MANIFEST, IndexStoreMismatchError, check_store, write_cases
from rag_ecg.search.vector_index import VectorIndex

log = logging.getLogger(__name__)

STATE = "build_state.json"
KILL_AT = "RAG_ECG_BUILD_KILL_AT"  # crash tests: SIGKILL the build at this step (chunk | texts | staged | swapped)


@dataclass
class BuildConfig:
    """What goes into an index and how its pages are drawn (saved in the index manifest)."""

    sources: list[str] | None = None  # case sources to include (None: all)
    splits: list[str] | None = field(default_factory=lambda: ["train"])  # PTB-XL splits (None: all); other sources have none
    include_unsplit: bool = False  # also include cases without a split (e.g. LUDB) — off: keep them for out-of-domain tests
    preset: str = "clean"  # artifact preset of the reference pages
    renders_per_case: int = 1  # >1: embed several renders (random layouts/presets) and store their mean
    signal_layouts: list[str] = field(default_factory=lambda: ["3x4+II"])  # trace towers: embed the signal
    # itself as a flawless read of these layouts (mean); the page is drawn only to be looked at. []: render and
    # digitise `preset` pages instead (what image towers always do)
    dpi: int = 100  # render resolution; the encoder sees ~350 px wide pages, so 100 dpi loses nothing
    page_width: int = 1100  # width of the JPEG page kept per case for reports and review pages (0: none)
    batch_size: int = 32  # images per encoder forward pass
    chunk: int = 256  # cases per saved step (what an interruption can cost)
    workers: int = 0  # render processes (0: all cores)
    k: int = 10  # neighbours that vote (calibration is fitted for this k)
    temperature: float = 0.05  # softmax temperature of the vote
    index: dict = field(default_factory=dict)  # IndexConfig fields (kind, nlist, ...)
    limit: int | None = None  # at most this many cases (smoke runs)
    calibration_queries: int = 200  # held-out (`val` split) ECGs drawn as pictures to fit probabilities on (0: none)

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
    """Worker: read a case's signal, draw its pages, keep one as a JPEG; returns PIL pages for the encoder, or
    the signal's perfect reads (trace arrays) when `layouts` are given."""
    case, preset, n, dpi, page_dir, page_width, layouts = args
    try:
        rec = load_case_record(case)
    except ValueError as exc:
        return case.id, [], str(exc)
    if layouts:
        if page_dir and page_width:
            seed = int(hashlib.sha256(f"{case.source}:{case.external_id}:0".encode()).hexdigest()[:8], 16)
            _save_jpeg(render_page(rec, preset=preset, seed=seed, dpi=dpi), Path(page_dir) / f"{case.id}.jpg",
                       page_width)
        return case.id, [TracePreprocess().perfect_read(rec, layout) for layout in layouts], None
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
    """Build (or resume) the index `name` in its staging folder, then swap it in; returns its folder."""
    cfg = cfg or BuildConfig()
    out = Path(out_dir) if out_dir else paths.index_dir() / name
    _check_out(out)
    encoder = ECGEncoder.load(encoder_dir)
    work = _staging(out, store, cfg, encoder.checkpoint_hash)
    state_path = work / STATE
    state = read_json(state_path) if state_path.exists() else {}
    if not state:
        _copy_encoder(Path(encoder_dir), work / "encoder")
        state = {"key": cfg.key(), "encoder_hash": encoder.checkpoint_hash, "skipped": {}}
        write_json(state_path, state)
    encoder = ECGEncoder.load(work / "encoder")
    if encoder.checkpoint_hash != state["encoder_hash"]:
        raise ArtifactError(f"{work / 'encoder'}: encoder copy does not match the build state; delete {work}")

    cases = select_cases(store, cfg)
    if not cases:
        raise InputError("no cases match the build settings (ingest data first, or change --split/--source)")
    icfg = IndexConfig.from_dict(cfg.index)
    img_path = work / "images.faiss"
    images = (VectorIndex.load(img_path, expected_encoder_hash=encoder.checkpoint_hash) if img_path.exists()
              else VectorIndex(encoder.embed_dim, icfg, encoder_hash=encoder.checkpoint_hash))
    extra = np.setdiff1d(images.ids, np.array([c.id for c in cases], np.int64))
    if len(extra):  # e.g. a smaller --limit than the build it resumes
        images.remove(extra)
        images.save(img_path)
    skipped: dict = state.get("skipped", {})
    todo = [c for c in cases if c.id not in images and str(c.id) not in skipped]
    page_dir = work / "pages" if cfg.page_width else None
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
            _step("chunk")
        if not img_path.exists():
            images.save(img_path)

        with store.session() as s:
            descriptions = scp_descriptions(s)
        done = [c for c in cases if c.id in images]
        texts = VectorIndex(encoder.embed_dim, icfg, encoder_hash=encoder.checkpoint_hash)
        ttask = bar.add_task("report texts", total=len(done))
        for chunk in _chunks(done, 512):
            emb = encoder.embed_texts([case_text(c.report, c.codes or {}, descriptions) for c in chunk])
            texts.add(np.array([c.id for c in chunk], np.int64), emb)
            bar.advance(ttask, len(chunk))
        texts.save(work / "texts.faiss")
        _step("texts")

    if isinstance(encoder.preprocess, TracePreprocess):  # the digitiser refuses pictures it cannot read traces from
        calibration = calibrate(images, done, cfg, floor=False)
    else:
        calibration = calibrate(images, done, cfg, _artifact_top_scores(images, done, cfg, encoder))
    queries = held_out_queries(store, cfg)
    if queries:
        calibration = fit_on_queries(calibration, images, done, queries, cfg, encoder, progress=progress)
    manifest = {
        "name": name, "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation": _generation(out) + 1, "rag_ecg_version": __version__,
        "encoder_hash": encoder.checkpoint_hash, "store": repr(store), "count": images.ntotal,
        "cases": write_cases(work, [(c.id, c.source, c.external_id) for c in done]),
        "skipped": skipped, "build": asdict(cfg), "calibration": asdict(calibration),
    }
    write_json(work / MANIFEST, manifest)  # the staged folder is complete
    _step("staged")
    old = replace_dir(work, out)  # one step: the old index or the new one, never neither
    _step("swapped")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("index %s: %d cases embedded, %d skipped -> %s", name, images.ntotal, len(skipped), out)
    return out


def staging_dir(out: Path) -> Path:
    """Where the build of index folder `out` works until it is complete (beside it: same filesystem)."""
    return out.parent / f".{out.name}.build"


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an index: the finished build takes the whole folder's place."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: not a folder (choose another --out for the index)")
    if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in (MANIFEST, STATE, "images.faiss")):
        raise InputError(f"{out}: not an index folder, and a build replaces the whole folder; choose another --out")


def _generation(folder: Path) -> int:
    """How many builds made the finished index in `folder` (0: none, or one from before builds were counted)."""
    try:
        return int(read_json(folder / MANIFEST).get("generation", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _staging(out: Path, store: Store, cfg: BuildConfig, encoder_hash: str) -> Path:
    """The staging folder to build in: resumed when an earlier build of the same settings left one, seeded from
    the live index (hard links) when that was built with the same settings, encoder and case store."""
    work = staging_dir(out)
    if (work / MANIFEST).exists():
        if _generation(work) <= _generation(out) and (out / MANIFEST).exists():
            log.info("%s: removing the index a finished build swapped out", work)
            shutil.rmtree(work)
        else:  # complete, but stopped before the swap: finish it (the store is read again)
            log.info("%s: finishing a build stopped before it replaced %s", work, out)
            (work / MANIFEST).unlink()
    if work.exists():
        state = _state(work)
        if state.get("key") != cfg.key() or state.get("encoder_hash") != encoder_hash:
            log.warning("%s: settings or encoder changed since the interrupted build; starting over", work)
            shutil.rmtree(work)
        elif (work / "images.faiss").exists():
            try:
                VectorIndex.load(work / "images.faiss", expected_encoder_hash=encoder_hash)
            except IndexLoadError as e:  # killed between the FAISS file and its manifest
                log.warning("%s; starting the build over", e)
                shutil.rmtree(work)
    if not work.exists() and _reusable(out, store, cfg, encoder_hash):
        log.info("%s: starting from the vectors of the live index %s", work, out)
        shutil.copytree(out, work, copy_function=_link)
        (work / MANIFEST).unlink()
    work.mkdir(parents=True, exist_ok=True)
    return work


def _state(folder: Path) -> dict:
    try:
        state = read_json(folder / STATE)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _reusable(out: Path, store: Store, cfg: BuildConfig, encoder_hash: str) -> bool:
    """Was the live index built with these settings and encoder, from this store's cases?"""
    state = _state(out)
    if not (out / MANIFEST).exists() or state.get("key") != cfg.key() or state.get("encoder_hash") != encoder_hash:
        return False
    try:
        manifest = read_json(out / MANIFEST)
        if not manifest.get("cases"):
            return False
        check_store(out, store, manifest)
    except (OSError, ValueError, IndexStoreMismatchError) as e:
        log.info("%s: not reused (%s)", out, e)
        return False
    return True


def _link(src: str, dst: str) -> None:
    """Hard link (files are only ever replaced by rename, never written in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        atomic_write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _step(name: str) -> None:
    """Crash tests: `RAG_ECG_BUILD_KILL_AT=<name>` kills the build here with SIGKILL (nothing gets to clean up)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _embed_chunk(chunk: list[Case], cfg: BuildConfig, encoder: ECGEncoder, page_dir, skipped: dict):
    layouts = cfg.signal_layouts if isinstance(encoder.preprocess, TracePreprocess) else []
    jobs = [(c, cfg.preset, cfg.renders_per_case, cfg.dpi, page_dir, cfg.page_width, layouts) for c in chunk]
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
        per_case = len(layouts) or cfg.renders_per_case
        emb = (encoder.embed_pixels(np.stack(flat)) if layouts else encoder.embed_images(flat, strict=False))
        emb = emb.reshape(len(part), per_case, -1).mean(axis=1)
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
    cal.reference_top, cal.fitted_on = top_quantiles(top), "library (leave-one-patient-out)"
    return cal


def held_out_queries(store: Store, cfg: BuildConfig) -> list[Case]:
    """The store's `val` split of the library's sources (PTB-XL fold 9) when the library leaves it out: what
    probabilities and thresholds are fitted on, drawn with seeds of their own. An `eval` of fold 9 scores other
    drawings of these same ECGs, so its threshold-dependent figures lean optimistic; fold 10 is the clean test."""
    if not cfg.calibration_queries or cfg.splits is None or "val" in cfg.splits:
        return []
    with store.session() as s:
        q = select(Case).where(Case.split == "val").order_by(Case.id)
        if cfg.sources:
            q = q.where(Case.source.in_(cfg.sources))
        return list(s.scalars(q.limit(cfg.calibration_queries)))


def _query_job(args):
    """Worker: a held-out case drawn with random layout and artifacts, read as the encoder reads a picture."""
    case, dpi, preprocess = args
    try:
        rec = load_case_record(case)
    except ValueError:
        return None
    seed = int(hashlib.sha256(f"{case.source}:{case.external_id}:calibration".encode()).hexdigest()[:8], 16)
    return preprocess.pixels(render_page(rec, preset="random", seed=seed, dpi=dpi), strict=False)


def fit_on_queries(cal: Calibration, images: VectorIndex, cases: list[Case], queries: list[Case], cfg: BuildConfig,
                   encoder: ECGEncoder, min_queries: int = 20, progress: bool = False) -> Calibration:
    """Refit `cal`'s probabilities, thresholds and similarity scale on held-out ECGs read as pictures: per label a
    logistic fusion of the neighbours' vote and the encoder's superclass head (Platt on the vote alone where
    the encoder has no head), F1-best thresholds on the fused probabilities."""
    workers = min(cfg.workers or os.cpu_count() or 1, len(queries))
    jobs = [(c, cfg.dpi, encoder.preprocess) for c in queries]
    # spawn, not fork: this process has run torch (the library's embeddings), and a forked child that runs torch
    # (the digitiser's segmenter) can hang on the inherited OpenMP state
    with _progress(progress) as bar, ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        task = bar.add_task("held-out pictures (calibration)", total=len(jobs))
        read = []
        for x in (pool.map(_query_job, jobs, chunksize=2) if workers > 1 else map(_query_job, jobs)):
            read.append(x)
            bar.advance(task)
    kept = [(c, x) for c, x in zip(queries, read) if x is not None]
    if len(kept) < min_queries:  # too few to fit on: keep the library's own calibration
        return cal
    emb = encoder.embed_pixels(np.stack([x for _, x in kept]))
    labels = {c.id: c.labels or [] for c in cases}
    votes, head = votes_and_head(emb, images, labels, cfg.k, cfg.temperature, encoder)
    y = labels_to_matrix([c.labels or [] for c, _ in kept], SUPERCLASSES)
    base = replace(cal, temperature=cfg.temperature, k=cfg.k, platt={}, fusion={}, thresholds={},
                   reference_top=top_quantiles((emb @ images.vectors(images.ids).T).max(axis=1)))
    out = fit_on_reads(base, votes, head, y, SUPERCLASSES,
                       f"{len(kept)} held-out ECGs (split val) drawn as pictures")
    log.info("calibration: fitted on %s", out.fitted_on)
    return out


def votes_and_head(emb: np.ndarray, images: VectorIndex, labels: dict[int, list[str]], k: int, temperature: float,
                   encoder: ECGEncoder) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, 5) similarity-weighted votes of the k nearest library cases (uncalibrated) and (n, 5) logits of the
    encoder's superclass head (None without one): what a `Calibration` turns into probabilities."""
    ids = images.ids
    y_lib = labels_to_matrix([labels.get(int(i)) or [] for i in ids], SUPERCLASSES)
    votes = knn_scores(emb, images.vectors(ids), y_lib, k, temperature)
    head = None
    if encoder.aux_head is not None and tuple(encoder.aux_classes) == tuple(SUPERCLASSES):
        with torch.inference_mode():
            head = encoder.aux_logits(torch.from_numpy(emb).to(encoder.device)).float().cpu().numpy()
    return votes, head


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
